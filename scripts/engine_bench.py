"""Decode throughput of the shard engine vs transformers' generate, same model, same run.

Usage: .venv/bin/python scripts/engine_bench.py [--batch 1,16,64] [--context 256] [--steps 16]
Prints, per batch size: tgserve decode tok/s, transformers generate tok/s (decode only: prefill
subtracted), and how much of a tgserve decode step attention takes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tests.golden.harness import Harness
from tgserve.launcher.weights import resolve_model
from tgserve.shard.layers.attention import paged


def tgserve_decode(h: Harness, batch: int, context: int, steps: int) -> tuple[float, float]:
    """(tokens/s over decode steps, share of step time spent in attention)."""
    h.outputs.clear()
    h._free_blocks = list(range(1, h.generator.kv_cache.num_blocks))
    ids = [[(7 * i + j) % 40000 + 100 for j in range(context)] for i in range(batch)]
    h.add([h.request(i, ids[i], steps + 2) for i in range(batch)])
    spent = [0.0]
    original = paged._decode

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = original(*args, **kwargs)
        spent[0] += time.perf_counter() - start
        return out

    paged._decode = timed
    try:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            h.step()
            times.append(time.perf_counter() - start)
    finally:
        paged._decode = original
    h.run_to_end()
    step = statistics.median(times)
    return batch / step, spent[0] / sum(times)


def hf_decode(model, batch: int, context: int, steps: int) -> float:  # type: ignore[no-untyped-def]
    ids = torch.tensor([[(7 * i + j) % 40000 + 100 for j in range(context)] for i in range(batch)])

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
        return time.perf_counter() - start

    run(1)  # warm-up: the first call pays one-time allocations
    prefill_only = min(run(1) for _ in range(2))
    total = run(steps + 1)
    return batch * steps / (total - prefill_only)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="1,16,64")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    source = resolve_model(None, None, None, Path.home() / ".cache" / "tgserve")
    assert source.gguf_file is not None
    h = Harness(source.path, num_blocks=1400, gguf_file=source.gguf_file)
    ref = AutoModelForCausalLM.from_pretrained(str(source.gguf_file.parent),
                                               gguf_file=source.gguf_file.name,
                                               dtype=torch.float32).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, context {args.context}")
    print(f"{'batch':>5} {'tgserve tok/s':>14} {'transformers tok/s':>19} {'ratio':>6} "
          f"{'attention':>10}")
    for b in (int(x) for x in args.batch.split(",")):
        ours, attention = tgserve_decode(h, b, args.context, args.steps)
        theirs = hf_decode(ref, b, args.context, args.steps)
        print(f"{b:>5} {ours:>14.1f} {theirs:>19.1f} {ours / theirs:>5.2f}x {attention:>9.0%}")


if __name__ == "__main__":
    main()
