"""Per-step cost of the shard client's protobuf conversion, for one decode step of a batch."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from tgserve.pb import generate_pb2 as pb
from tgserve.router.core.batch import CachedBatch, ShardTimings, generation_events
from tgserve.router.shard_client import ShardStep, to_pb_cached_batch, to_step_result


def decode_answer(size: int, top_n: int) -> tuple[CachedBatch, ShardStep]:
    """A batch of `size` requests and the shard's answer to one Decode of it, one token each."""
    ids = list(range(size))
    generations = []
    for i in ids:
        top = [pb.Tokens(ids=list(range(top_n)), logprobs=[-1.0] * top_n,
                         texts=["x"] * top_n, is_special=[False] * top_n)] if top_n else []
        generations.append(pb.Generation(
            request_id=i,
            tokens=pb.Tokens(ids=[1000 + i], logprobs=[-0.5], texts=[" word"], is_special=[False]),
            top_tokens=top,
        ))
    cached = pb.CachedBatch(id=1, request_ids=ids, size=size, max_tokens=size * 300)
    batch = CachedBatch(1, tuple(ids), size, size * 300)
    return batch, ShardStep(generations, cached, ShardTimings(1, 1, 1))


def convert(batch: CachedBatch, answer: ShardStep) -> None:
    """The conversion alone: the batch to its DecodeRequest, the answer to core types."""
    pb.DecodeRequest(batches=[to_pb_cached_batch(batch)], decode_ahead=True)
    to_step_result(answer)


def one_step(batch: CachedBatch, answer: ShardStep) -> None:
    """What the router does around one Decode: the request out, the answer to events (kept, as
    the requests' queues keep them until their consumers run)."""
    pb.DecodeRequest(batches=[to_pb_cached_batch(batch)], decode_ahead=True)
    result = to_step_result(answer)
    sink: list[object] = []
    for generation in result.generations:
        sink.extend(generation_events(generation, False, 0.0, 0.0))


def best_time(fn: Callable[[], None], steps: int, repeats: int) -> float:
    # CPU time of this thread, not wall time: the cores are often shared with other work.
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(steps):
            fn()
        best = min(best, (time.thread_time() - start) / steps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--top-n-tokens", type=int, default=0)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    batch, answer = decode_answer(args.batch_size, args.top_n_tokens)
    conversion = best_time(lambda: convert(batch, answer), args.steps, args.repeats)
    step = best_time(lambda: one_step(batch, answer), args.steps, args.repeats)
    print(f"batch {args.batch_size}, top_n {args.top_n_tokens}: conversion {conversion * 1e6:.0f}"
          f" us per step; with the events {step * 1e6:.0f} us")


if __name__ == "__main__":
    main()
