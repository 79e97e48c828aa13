"""next_batch: budgets, min/max size, head-of-line blocking, dropped entries, the pb Batch."""

from __future__ import annotations

from tgserve.router.core.blocks import BlockAllocator
from tgserve.router.core.queue import Entry, Queue
from tgserve.router.shard_client import to_pb_batch
from tgserve.router.types import SamplingParameters, StoppingParameters, ValidRequest


class ListSink(list):
    def put_nowait(self, item: object) -> None:
        self.append(item)


def request(input_length: int, max_new_tokens: int = 1, **kwargs: object) -> ValidRequest:
    return ValidRequest(
        inputs="x" * input_length,
        input_ids=tuple(range(1, input_length + 1)),
        parameters=SamplingParameters(),
        stopping=StoppingParameters(max_new_tokens=max_new_tokens),
        **kwargs,  # type: ignore[arg-type]
    )


def make_queue(num_blocks: int = 100, block_size: int = 4, **kwargs: object) -> Queue:
    allocator = BlockAllocator(num_blocks, block_size)
    return Queue(allocator, clock=lambda: 7.0, **kwargs)  # type: ignore[arg-type]


def add(queue: Queue, *requests: ValidRequest) -> list[Entry]:
    entries = [Entry(r, ListSink(), queued_at=1.0) for r in requests]
    for e in entries:
        queue.append(e)
    return entries


def test_empty_queue_or_zero_budgets_give_nothing() -> None:
    queue = make_queue()
    assert queue.next_batch(None, None, 100, 100) is None
    add(queue, request(3))
    assert queue.next_batch(None, None, 0, 100) is None
    assert queue.next_batch(None, None, 100, 0) is None
    assert queue.next_batch(None, 0, 100, 100) is None
    assert len(queue) == 1
    assert queue.allocator.used_blocks == 0


def test_allocates_input_plus_max_new_minus_one_tokens() -> None:
    queue = make_queue(block_size=4)
    add(queue, request(5, max_new_tokens=4))
    nb = queue.next_batch(None, None, 100, 100)
    assert nb is not None
    (r,) = nb.batch.requests
    assert len(r.allocation.slots) == 5 + 4 - 1
    assert len(r.allocation.blocks) == 2
    assert queue.allocator.used_blocks == 2


def test_prefill_budget_is_rounded_up_to_a_block() -> None:
    # Budget 10 with blocks of 4 becomes 12: two prompts of 6 fit, a third does not.
    queue = make_queue(block_size=4)
    add(queue, request(6), request(6), request(6))
    nb = queue.next_batch(None, None, 10, 1000)
    assert nb is not None
    assert [r.id for r in nb.batch.requests] == [0, 1]
    assert len(queue) == 1


def test_prefill_budget_blocks_the_head_and_frees_its_blocks() -> None:
    queue = make_queue(block_size=1)
    add(queue, request(3), request(8), request(1))
    nb = queue.next_batch(None, None, 5, 1000)
    assert nb is not None
    # The 8-token prompt does not fit; the 1-token prompt behind it must not skip ahead.
    assert [r.id for r in nb.batch.requests] == [0]
    assert len(queue) == 2
    assert queue.allocator.used_blocks == 3  # only request 0 holds blocks


def test_head_of_line_blocking_when_blocks_run_out() -> None:
    queue = make_queue(num_blocks=4, block_size=4)  # 3 usable blocks = 12 tokens
    first, big, small = add(queue, request(8), request(8), request(2))
    nb = queue.next_batch(None, None, 1000, 1000)
    assert nb is not None
    assert list(nb.entries) == [first.id]
    assert big.allocation is None and small.allocation is None
    # Once the first request's blocks return, the big one goes first.
    queue.allocator.free(first.allocation)  # type: ignore[arg-type]
    nb = queue.next_batch(None, None, 1000, 1000)
    assert nb is not None
    assert list(nb.entries) == [big.id, small.id]


def test_max_size_caps_the_batch() -> None:
    queue = make_queue()
    add(queue, *(request(2) for _ in range(5)))
    nb = queue.next_batch(None, 3, 1000, 1000)
    assert nb is not None
    assert nb.batch.size == 3 and len(nb.batch.requests) == 3
    assert len(queue) == 2


def test_min_size_larger_than_queue_gives_nothing() -> None:
    queue = make_queue()
    add(queue, request(2), request(2))
    assert queue.next_batch(3, None, 1000, 1000) is None
    assert len(queue) == 2


def test_min_size_not_reached_pushes_everything_back_in_order() -> None:
    queue = make_queue(block_size=1)
    entries = add(queue, request(4), request(4), request(4))
    # Only two prompts fit the prefill budget but three are required.
    assert queue.next_batch(3, None, 8, 1000) is None
    assert queue.allocator.used_blocks == 0
    assert all(e.allocation is None for e in entries)
    nb = queue.next_batch(None, None, 1000, 1000)
    assert nb is not None
    assert list(nb.entries) == [e.id for e in entries]


def test_cancelled_entries_are_dropped_and_reported() -> None:
    dropped: list[Entry] = []
    queue = make_queue(on_drop=dropped.append)
    a, b, c = add(queue, request(2), request(2), request(2))
    b.cancelled = True
    nb = queue.next_batch(None, None, 1000, 1000)
    assert nb is not None
    assert list(nb.entries) == [a.id, c.id]
    assert dropped == [b]
    assert b.allocation is None
    assert len(queue) == 0


def test_ids_increase_and_started_at_is_stamped() -> None:
    queue = make_queue()
    add(queue, request(2))
    first = queue.next_batch(None, None, 1000, 1000)
    add(queue, request(2))
    second = queue.next_batch(None, None, 1000, 1000)
    assert first is not None and second is not None
    assert second.batch.id == first.batch.id + 1
    assert second.batch.requests[0].id == first.batch.requests[0].id + 1
    assert all(e.started_at == 7.0 for e in (*first.entries.values(), *second.entries.values()))


def test_pb_batch_carries_everything_the_shard_needs() -> None:
    queue = make_queue(block_size=4)
    params = SamplingParameters(temperature=0.5, top_k=3, do_sample=True, seed=42,
                                presence_penalty=0.25, logit_bias={7: -1.5})
    r = ValidRequest(
        inputs="hello",
        input_ids=(5, 6, 7),
        parameters=params,
        stopping=StoppingParameters(max_new_tokens=6, stop_sequences=("\n",),
                                    ignore_eos_token=True),
        top_n_tokens=2,
        decoder_input_details=True,
        truncate=None,
        add_special_tokens=False,
    )
    (entry,) = add(queue, r)
    nb = queue.next_batch(None, None, 1000, 1000)
    assert nb is not None
    batch = to_pb_batch(nb.batch)  # what the shard client sends
    assert batch.size == 1 and batch.max_tokens == 3 + 6 and batch.max_blocks == 2
    (pb,) = batch.requests
    assert pb.id == entry.id and pb.inputs == "hello"
    assert list(pb.input_ids) == [5, 6, 7]
    assert pb.truncate == 3
    assert pb.prefill_logprobs is True and pb.top_n_tokens == 2
    assert pb.add_special_tokens is False
    assert list(pb.slots) == list(entry.allocation.slots)  # type: ignore[union-attr]
    assert list(pb.blocks) == list(entry.allocation.blocks)  # type: ignore[union-attr]
    assert pb.parameters.top_k == 3 and pb.parameters.seed == 42 and pb.parameters.do_sample
    assert abs(pb.parameters.temperature - 0.5) < 1e-6
    assert dict(pb.parameters.logit_bias) == {7: -1.5}
    assert abs(pb.parameters.presence_penalty - 0.25) < 1e-6
    assert pb.stopping_parameters.max_new_tokens == 6
    assert list(pb.stopping_parameters.stop_sequences) == ["\n"]
    assert pb.stopping_parameters.ignore_eos_token is True
