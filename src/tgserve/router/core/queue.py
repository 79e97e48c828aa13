"""FIFO request queue and TGI's next_batch policy: who joins the next prefill, within budgets."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from tgserve.router.core.batch import Batch, BatchRequest
from tgserve.router.core.blocks import BlockAllocation, BlockAllocator
from tgserve.router.types import InferError, InferEvent, ValidRequest


class EventSink(Protocol):
    """Where a request's events go (an asyncio.Queue in the scheduler, a list-like in tests)."""

    def put_nowait(self, item: InferEvent | InferError) -> None: ...


@dataclass(eq=False)
class Entry:
    """One request's life in the router: queued, then batched, until it ends or is cancelled."""

    request: ValidRequest
    sink: EventSink
    queued_at: float
    id: int = -1  # assigned by Queue.append
    started_at: float | None = None  # when it joined a batch
    cancelled: bool = False  # the consumer went away: drop it at the next chance
    allocation: BlockAllocation | None = None

    @property
    def kv_tokens(self) -> int:
        """KV entries the request may write: the last generated token is never fed back."""
        return self.request.input_length + self.request.stopping.max_new_tokens - 1


@dataclass
class NextBatch:
    entries: dict[int, Entry]
    batch: Batch


@dataclass
class Queue:
    """Strict FIFO; a request that does not fit blocks the ones behind it (no skipping)."""

    allocator: BlockAllocator
    speculate: int = 0
    # Told about every cancelled entry the queue throws away (for the "dropped" failure counter).
    on_drop: Callable[[Entry], None] | None = None
    clock: Callable[[], float] = time.monotonic
    _entries: deque[Entry] = field(default_factory=deque, init=False, repr=False)
    _next_request_id: int = field(default=0, init=False, repr=False)
    _next_batch_id: int = field(default=0, init=False, repr=False)

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, entry: Entry) -> int:
        entry.id = self._next_request_id
        self._next_request_id += 1
        self._entries.append(entry)
        return entry.id

    def waiting_tokens(self) -> int:
        """Prompt tokens of the requests still waiting (cancelled ones excluded)."""
        return sum(e.request.input_length for e in self._entries if not e.cancelled)

    def drain(self) -> list[Entry]:
        """Remove and return every waiting entry (shutdown)."""
        entries = list(self._entries)
        self._entries.clear()
        return entries

    def next_batch(
        self,
        min_size: int | None,
        max_size: int | None,
        prefill_token_budget: int,
        token_budget: int,
    ) -> NextBatch | None:
        """Take entries from the front while blocks and the prefill budget allow (TGI §3.2)."""
        if not self._entries or (min_size is not None and len(self._entries) < min_size):
            return None
        if max_size == 0 or prefill_token_budget <= 0 or token_budget <= 0:
            return None
        block_size = self.allocator.block_size
        prefill_budget = -(-prefill_token_budget // block_size) * block_size
        taken: list[Entry] = []
        prefill_tokens = 0
        while self._entries and (max_size is None or len(taken) < max_size):
            entry = self._entries.popleft()
            if entry.cancelled:
                if self.on_drop is not None:
                    self.on_drop(entry)
                continue
            if not self._admit(entry, prefill_tokens, prefill_budget):
                self._entries.appendleft(entry)
                break
            assert entry.allocation is not None
            prefill_tokens += entry.request.input_length - entry.allocation.prefix_len
            taken.append(entry)
        if not taken or (min_size is not None and len(taken) < min_size):
            self._push_back(taken)
            return None
        return self._build(taken)

    def _admit(self, entry: Entry, prefill_tokens: int, prefill_budget: int) -> bool:
        """Give the entry its blocks if they exist and its prompt fits the prefill budget."""
        request = entry.request
        # With prefill logprobs asked, every prompt token must be computed: no prefix reuse.
        prefix_ids = None if request.decoder_input_details else request.input_ids
        allocation = self.allocator.allocate(
            entry.kv_tokens + self.speculate, prefix_ids, request.cache_salt
        )
        if allocation is None:
            return False
        if allocation.prefix_len >= request.input_length:
            # At least one prompt token must run through the model to produce logits.
            allocation = _with_prefix(allocation, request.input_length - 1)
        postfix = request.input_length - allocation.prefix_len
        if prefill_tokens + postfix > prefill_budget:
            self.allocator.free(allocation)
            return False
        entry.allocation = allocation
        return True

    def _push_back(self, entries: list[Entry]) -> None:
        for entry in reversed(entries):
            if entry.allocation is not None:
                self.allocator.free(entry.allocation)
                entry.allocation = None
            self._entries.appendleft(entry)

    def _build(self, entries: list[Entry]) -> NextBatch:
        now = self.clock()
        requests = []
        max_tokens = 0
        max_blocks = 0
        for entry in entries:
            assert entry.allocation is not None
            entry.started_at = now
            requests.append(BatchRequest(entry.id, entry.request, entry.allocation))
            max_tokens += entry.request.input_length + entry.request.stopping.max_new_tokens
            max_blocks = max(max_blocks, len(entry.allocation.blocks))
        batch = Batch(
            id=self._next_batch_id,
            requests=requests,
            size=len(requests),
            max_tokens=max_tokens,
            max_blocks=max_blocks,
        )
        self._next_batch_id += 1
        return NextBatch({e.id: e for e in entries}, batch)


def _with_prefix(allocation: BlockAllocation, prefix_len: int) -> BlockAllocation:
    return replace(allocation, prefix_len=prefix_len)

