"""Continuous batching: the background task that runs queued requests on the shards step by step."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from tgserve.router.core.admission import StepPace, admit
from tgserve.router.core.batch import (
    Batch,
    BatchRequest,
    CachedBatch,
    Generation,
    ShardTimings,
    StepResult,
    generation_events,
)
from tgserve.router.core.blocks import HEALTH_BLOCK, BlockAllocation, BlockAllocator
from tgserve.router.core.queue import Entry, NextBatch, Queue
from tgserve.router.core.watchdog import StepWatch, Watchdog, WatchdogSettings
from tgserve.router.types import (
    DeadlineExceededError,
    DeadlineUnreachableError,
    EndEvent,
    GenerationError,
    IncompleteGenerationError,
    InferError,
    InferEvent,
    SamplingParameters,
    StoppingParameters,
    ValidRequest,
)

log = logging.getLogger(__name__)

U64_MAX = 2**64 - 1
# Any id below every vocabulary size: warmup and the liveness check only need a valid token.
DUMMY_TOKEN_ID = 0
# What clients read when a step fails for a reason not meant for them (the log has it whole).
SHARD_FAILED = "the model shard failed"


@dataclass(frozen=True)
class SchedulerSettings:
    """Batching policy (TGI's flag names); the token limits are filled in after warmup."""

    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int = 16000
    waiting_served_ratio: float = 0.3
    max_waiting_tokens: int = 20
    max_batch_size: int | None = None
    block_size: int = 16
    # What the user asked for (None: the shards decide at warmup).
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    # With mixed prefill, new prompt tokens admitted per step while others decode: small steps let
    # early arrivals start at once instead of all waiting for one huge prefill (time to first
    # token).
    # A deep queue grows it (step_prefill_budget).
    max_step_prefill_tokens: int = 256


# A queue deeper than this many steps' worth of --max-step-prefill-tokens grows the step's budget
# so that it drains in about this many steps.
QUEUE_DRAIN_STEPS = 8


def step_prefill_budget(
    settings: SchedulerSettings, waiting_tokens: int, backlog_budget: int = 0
) -> int:
    """Prompt tokens one mixed step may admit, the running rows included.

    --max-step-prefill-tokens while the queue is shallow: a new arrival then waits at most one short
    step. With more waiting than QUEUE_DRAIN_STEPS such steps would admit, their time to first token
    is queueing time and the queue drains sooner in fewer, bigger steps (fewer passes over the
    weights per prompt token, a shorter tail of half-empty decode steps): the budget becomes
    1/QUEUE_DRAIN_STEPS of what waits, up to --max-batch-prefill-tokens.

    The budget a backlog reached holds until the queue is empty (`backlog_budget`, the last step's):
    one that shrank with the queue admitted a burst's last prompts one a step, each step paying a
    whole decode of the running batch as well, and spread the finish times into a tail of ever
    smaller decode batches (docs/design/mixed-prefill.md).
    """
    base = min(settings.max_step_prefill_tokens, settings.max_batch_prefill_tokens)
    if waiting_tokens <= 0:
        return base
    grown = max(base, waiting_tokens // QUEUE_DRAIN_STEPS, backlog_budget)
    return min(settings.max_batch_prefill_tokens, grown)


class SchedulerObserver(Protocol):
    """Hooks for metrics; the scheduler only reports, it never depends on the answers."""

    def on_queue_size(self, size: int) -> None: ...
    def on_next_batch_size(self, size: int) -> None: ...
    def on_batch_size(self, size: int, max_tokens: int) -> None: ...
    def on_concat(self, reason: str) -> None: ...
    def on_prefill(self, duration: float, batch_size: int, timings: ShardTimings) -> None: ...
    def on_decode(self, duration: float, batch_size: int, timings: ShardTimings) -> None: ...
    def on_inference_failure(self, method: str) -> None: ...
    def on_filter(self, method: str, duration: float) -> None: ...
    def on_blocks(self, used: int, total: int) -> None: ...
    def on_request_dropped(self) -> None: ...
    def on_prompt_tokens(self, computed: int, cached: int) -> None: ...


class NoopObserver:
    def on_queue_size(self, size: int) -> None:
        pass

    def on_next_batch_size(self, size: int) -> None:
        pass

    def on_batch_size(self, size: int, max_tokens: int) -> None:
        pass

    def on_concat(self, reason: str) -> None:
        pass

    def on_prefill(self, duration: float, batch_size: int, timings: ShardTimings) -> None:
        pass

    def on_decode(self, duration: float, batch_size: int, timings: ShardTimings) -> None:
        pass

    def on_inference_failure(self, method: str) -> None:
        pass

    def on_filter(self, method: str, duration: float) -> None:
        pass

    def on_blocks(self, used: int, total: int) -> None:
        pass

    def on_request_dropped(self) -> None:
        pass

    def on_prompt_tokens(self, computed: int, cached: int) -> None:
        pass


class ShardBackend(Protocol):
    """The part of ShardClient the scheduler uses (tests pass a fake)."""

    async def health(self) -> None: ...
    async def clear_cache(self, batch_id: int | None = None) -> None: ...
    async def filter_batch(self, batch_id: int, request_ids: Sequence[int]) -> CachedBatch: ...
    async def prefill(
        self,
        batch: Batch,
        cached_batch: CachedBatch | None = None,
        decode_ahead: bool = False,
    ) -> StepResult: ...
    async def decode(
        self, batches: Sequence[CachedBatch], decode_ahead: bool = False
    ) -> StepResult: ...


Entries = dict[int, Entry]


class Scheduler:
    """Queue + block allocator + one batching task; `schedule` is what the HTTP layer calls."""

    def __init__(
        self,
        client: ShardBackend,
        settings: SchedulerSettings,
        observer: SchedulerObserver | None = None,
        speculate: int = 0,
        mixed_prefill: bool = False,
        prefix_caching: bool = False,
        watchdog: WatchdogSettings | None = None,
    ) -> None:
        self._client = client
        self.settings = settings
        # The shards can prefill new requests in the same forward as the running batch's next
        # tokens, so new requests join at once instead of waiting for waiting_served_ratio.
        self.mixed_prefill = mixed_prefill
        self._observer: SchedulerObserver = observer or NoopObserver()
        num_blocks = settings.max_batch_total_tokens // settings.block_size
        # Blocks of prompts already computed are reused by later prompts that start the same way.
        self.allocator = BlockAllocator(num_blocks, settings.block_size, prefix_caching)
        self.queue = Queue(self.allocator, speculate, on_drop=self._on_queue_drop)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: Entries = {}
        self._joining: Entries = {}  # a new batch while its prefill is in flight
        self._backlog_budget = 0  # the step prefill budget of the queue's current backlog
        self._healthy = True
        self.pace = StepPace()  # what deadline admission estimates with
        self.watchdog = Watchdog(watchdog or WatchdogSettings())
        self._watchdog_task: asyncio.Task[None] | None = None

    @property
    def prefix_caching(self) -> bool:
        """Whether a prompt computed once is reused by later requests that start with it."""
        return self.allocator.prefix_caching

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tgserve-batching")
            self._watchdog_task = asyncio.create_task(self.watchdog.run(), name="tgserve-watchdog")
            self._wake.set()

    async def stop(self) -> None:
        """Stop batching; every request still waiting or running ends with an error."""
        task, self._task = self._task, None
        for t in (task, self._watchdog_task):
            if t is not None:
                t.cancel()
                try:
                    await t
                except asyncio.CancelledError:
                    pass
        self._watchdog_task = None
        error = GenerationError("the server is shutting down")
        for entries in (self._running, self._joining):
            self._fail(entries, error)
        self._fail({e.id: e for e in self.queue.drain()}, error)

    # ---- the backend interface -------------------------------------------------------------

    async def schedule(self, request: ValidRequest) -> AsyncIterator[InferEvent]:
        """Queue the request and yield its events; closing the iterator cancels the request."""
        self._check_fits(request)
        self._check_deadline(request)
        sink: asyncio.Queue[InferEvent | InferError] = asyncio.Queue()
        entry = Entry(request, sink, queued_at=time.monotonic())
        self.queue.append(entry)
        self._observer.on_queue_size(len(self.queue))
        self._wake.set()
        done = False
        try:
            while not done:
                item = await self._next_item(entry, sink)
                if isinstance(item, InferError):
                    done = True
                    raise item
                done = isinstance(item, EndEvent)
                yield item
        finally:
            if not done:
                # The batching task drops it after the step in flight (or from the queue).
                entry.cancelled = True
                self._wake.set()

    async def _next_item(
        self, entry: Entry, sink: asyncio.Queue[InferEvent | InferError]
    ) -> InferEvent | InferError:
        """The entry's next event; past its deadline while still queued, it leaves the queue."""
        deadline = entry.request.deadline
        while deadline is not None and entry.started_at is None:
            try:
                return await asyncio.wait_for(sink.get(), deadline - time.monotonic())
            except TimeoutError:
                if entry.started_at is not None:
                    break  # a batch took it meanwhile: its first token is on the way
                # Cancelled, the batching task drops it from the queue: the shards never see it.
                entry.cancelled = True
                self._wake.set()
                ahead = self.pace.first_token_eta(self.queue.waiting_tokens(), 0,
                                                  self._step_tokens(), bool(self._running))
                return DeadlineExceededError(time.monotonic() - entry.queued_at,
                                             max(ahead or 1.0, 1.0))
        return await sink.get()

    def _check_deadline(self, request: ValidRequest) -> None:
        if request.deadline is None:
            return
        remaining = request.deadline - time.monotonic()
        verdict = admit(self.pace, remaining, self.queue.waiting_tokens(), request.input_length,
                        self._step_tokens(), bool(self._running))
        if not verdict.admitted:
            assert verdict.eta is not None
            raise DeadlineUnreachableError(verdict.eta, remaining, verdict.retry_after)

    def _step_tokens(self) -> int:
        """Prompt tokens one step admits now (what the queue drains by, step after step)."""
        if self.mixed_prefill:
            return step_prefill_budget(self.settings, self.queue.waiting_tokens(),
                                       self._backlog_budget)
        return self.settings.max_batch_prefill_tokens

    def readiness(self) -> str | None:
        """Why the engine cannot take requests now (None: it can): for the readiness probe."""
        if self.watchdog.stalled is not None:
            return "engine_stalled"
        if not self._healthy:
            return "shard_unreachable"
        return None

    async def health(self) -> bool:
        """Cheap Health RPC while healthy; after a failure, a real one-token prefill on block 0.

        A stalled step (the watchdog's verdict) is unhealthy without asking the shards: they are
        busy with it, and a health RPC would only queue behind it."""
        if self.watchdog.stalled is not None:
            return False
        if self._healthy:
            try:
                await self._client.health()
                ok = True
            except Exception:  # noqa: BLE001 - any failure means unhealthy
                log.exception("shard health check failed")
                ok = False
        else:
            ok = await self._liveness_prefill()
        self._healthy = ok
        return ok

    def request_in_flight(self, request_id: int) -> ValidRequest | None:
        """The request a batch on the shards runs under this id; None for any other id (one
        still queued, gone, or the liveness check's). Tracing uses it to find a step's spans."""
        entry = self._running.get(request_id) or self._joining.get(request_id)
        return entry.request if entry is not None else None

    def _check_fits(self, request: ValidRequest) -> None:
        # Validation should have refused these; a request that can never fit would block the
        # head of the queue forever, so it is refused here too.
        tokens = request.input_length + request.stopping.max_new_tokens - 1 + self.queue.speculate
        if not self.allocator.can_ever_fit(tokens):
            raise GenerationError(
                f"request needs {tokens} KV tokens but the cache holds "
                f"{self.allocator.total_tokens}"
            )
        bs = self.allocator.block_size
        prefill_budget = -(-self.settings.max_batch_prefill_tokens // bs) * bs
        if request.input_length > prefill_budget:
            raise GenerationError(
                f"request has {request.input_length} prompt tokens but "
                f"max_batch_prefill_tokens is {self.settings.max_batch_prefill_tokens}"
            )

    async def _liveness_prefill(self) -> bool:
        request = ValidRequest(
            inputs="liveness",
            input_ids=(DUMMY_TOKEN_ID,),
            parameters=SamplingParameters(),
            stopping=StoppingParameters(max_new_tokens=1),
            truncate=1,
        )
        health_slot = HEALTH_BLOCK * self.allocator.block_size
        allocation = BlockAllocation(-1, (HEALTH_BLOCK,), (health_slot,))
        batch = Batch(id=U64_MAX, requests=[BatchRequest(U64_MAX, request, allocation)], size=1,
                      max_tokens=2, max_blocks=1)
        try:
            result = await self._client.prefill(batch)
            if result.batch is not None:
                await self._client.clear_cache(result.batch.id)
        except Exception:  # noqa: BLE001 - any failure means unhealthy
            log.exception("liveness prefill failed")
            return False
        return True

    # ---- the batching task -----------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._serve_queue()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the loop must outlive any bug in one step
                log.exception("batching step failed")
                error = GenerationError("internal scheduler error")  # the details: logged above
                self._fail(self._running, error)
                self._fail(self._joining, error)
                await self._best_effort_clear(None)
            self._observer.on_batch_size(0, 0)

    async def _serve_queue(self) -> None:
        while (nb := self._first_batch()) is not None:
            self._running = nb.entries
            cached = await self._prefill(nb, self._running)
            waiting_tokens = 1
            while cached is not None:
                self._observer.on_batch_size(cached.size, cached.max_tokens)
                if self.mixed_prefill:
                    cached = await self._mixed_step(cached)
                    continue
                batches = [cached]
                new = self._next_joining_batch(cached, waiting_tokens)
                if new is not None:
                    self._joining = new.entries
                    # Its rows decode next together with the running ones, not ahead alone.
                    new_cached = await self._prefill(new, new.entries, ahead=False)
                    waiting_tokens = 1
                    if new_cached is not None:
                        self._running.update(new.entries)
                        batches.append(new_cached)
                    self._joining = {}
                cached = await self._decode(batches, self._running)
                waiting_tokens += 1

    def _first_batch(self) -> NextBatch | None:
        s = self.settings
        if self.mixed_prefill:
            # Start with one step's worth: the rest joins over the next steps, first come first.
            return self._mixed_admission(0, s.max_batch_size, s.max_batch_total_tokens)
        return self._next_batch(
            None, s.max_batch_size, s.max_batch_prefill_tokens, s.max_batch_total_tokens
        )

    def _mixed_admission(
        self, running: int, max_size: int | None, token_budget: int
    ) -> NextBatch | None:
        s = self.settings
        waiting = self.queue.waiting_tokens()
        step_budget = step_prefill_budget(s, waiting, self._backlog_budget)
        self._backlog_budget = step_budget if waiting else 0
        new = self._next_batch(None, max_size, max(step_budget - running, 1), token_budget)
        if new is None and len(self.queue) and max_size != 0:
            # A prompt longer than the step budget still gets in, alone, within the full budget.
            new = self._next_batch(None, 1, s.max_batch_prefill_tokens, token_budget)
        return new

    async def _mixed_step(
        self, cached: CachedBatch
    ) -> CachedBatch | None:
        """Admit whoever fits right away: their prompts ride in the running batch's next forward."""
        s = self.settings
        max_size = None if s.max_batch_size is None else max(s.max_batch_size - cached.size, 0)
        token_budget = max(s.max_batch_total_tokens - cached.max_tokens, 0)
        new = self._mixed_admission(cached.size, max_size, token_budget)
        if new is None:
            return await self._decode([cached], self._running)
        self._observer.on_concat("chunking")
        self._running.update(new.entries)
        return await self._prefill(new, self._running, cached)

    def _next_joining_batch(
        self, cached: CachedBatch, waiting_tokens: int
    ) -> NextBatch | None:
        """New requests may pause the running batch once enough wait or they waited too long."""
        s = self.settings
        size = cached.size
        wait_exceeded = waiting_tokens >= s.max_waiting_tokens
        min_size = None if wait_exceeded else math.floor(size * s.waiting_served_ratio)
        max_size = None if s.max_batch_size is None else max(s.max_batch_size - size, 0)
        token_budget = max(s.max_batch_total_tokens - cached.max_tokens, 0)
        new = self._next_batch(min_size, max_size, s.max_batch_prefill_tokens, token_budget)
        if new is not None:
            self._observer.on_concat("wait_exceeded" if wait_exceeded else "backpressure")
        return new

    def _next_batch(
        self, min_size: int | None, max_size: int | None, prefill_budget: int, token_budget: int
    ) -> NextBatch | None:
        nb = self.queue.next_batch(min_size, max_size, prefill_budget, token_budget)
        self._observer.on_queue_size(len(self.queue))
        if nb is not None:
            self._observer.on_next_batch_size(len(nb.entries))
            cached = sum(e.allocation.prefix_len for e in nb.entries.values() if e.allocation)
            total = sum(e.request.input_length for e in nb.entries.values())
            self._observer.on_prompt_tokens(total - cached, cached)
            self._report_blocks()
        return nb

    async def _prefill(
        self,
        nb: NextBatch,
        entries: Entries,
        running: CachedBatch | None = None,
        ahead: bool = True,
    ) -> CachedBatch | None:
        start = time.perf_counter()
        computed = sum(e.request.input_length - (e.allocation.prefix_len if e.allocation else 0)
                       for e in nb.entries.values())
        watch = StepWatch("prefill", computed, tuple(entries),
                          (nb.batch.id,) + ((running.id,) if running is not None else ()))
        try:
            with self.watchdog.watching(watch):
                result = await self._client.prefill(nb.batch, running,
                                                    decode_ahead=ahead and self._nothing_waits())
        except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the server
            failed = [nb.batch.id] + ([running.id] if running is not None else [])
            await self._step_failed("prefill", failed, entries, err)
            return None
        duration = time.perf_counter() - start
        if running is not None and self.pace.decode_step_s is not None:
            # The running rows' decode rode in the same forward: it is not prompt time.
            duration = max(duration - self.pace.decode_step_s, 0.0)
        self.pace.on_prefill(duration, computed)
        self._observer.on_prefill(time.perf_counter() - start, len(entries), result.timings)
        for entry in nb.entries.values():
            if entry.allocation is not None:
                self.allocator.commit(entry.allocation)
        return await self._after_step("prefill", result, entries)

    async def _decode(
        self, batches: list[CachedBatch], entries: Entries
    ) -> CachedBatch | None:
        start = time.perf_counter()
        watch = StepWatch("decode", len(entries), tuple(entries), tuple(b.id for b in batches))
        try:
            with self.watchdog.watching(watch):
                result = await self._client.decode(batches, decode_ahead=self._nothing_waits())
        except Exception as err:  # noqa: BLE001 - a failed step fails its requests, not the server
            await self._step_failed("decode", [b.id for b in batches], entries, err)
            return None
        self.pace.on_decode(time.perf_counter() - start)
        self._observer.on_decode(time.perf_counter() - start, len(entries), result.timings)
        return await self._after_step("decode", result, entries)

    def _nothing_waits(self) -> bool:
        """Whether the shards may compute the batch's next decode step before it is asked for.

        Only with an empty queue: a request waiting now would join at the next step, which the
        shard would then have to compute in two forwards (the step done ahead, then the prompts).
        """
        return len(self.queue) == 0

    async def _step_failed(
        self, method: str, batch_ids: list[int], entries: Entries, err: Exception
    ) -> None:
        log.error("%s failed: %s", method, err)
        self._healthy = False
        self._observer.on_inference_failure(method)
        for batch_id in batch_ids:
            await self._best_effort_clear(batch_id)
        # Anything but a GenerationError is not meant for clients: its text is in the log above.
        error = err if isinstance(err, GenerationError) else GenerationError(SHARD_FAILED)
        self._fail(entries, error)

    async def _after_step(
        self, method: str, result: StepResult, entries: Entries
    ) -> CachedBatch | None:
        start = time.perf_counter()
        self._send_generations(result.generations, entries)
        cached = await self._filter(result.batch, entries)
        self._observer.on_filter(method, time.perf_counter() - start)
        self._report_blocks()
        return cached

    def _send_generations(
        self, generations: Sequence[Generation], entries: Entries
    ) -> None:
        for generation in generations:
            entry = entries.get(generation.request_id)
            if entry is None or entry.cancelled:
                continue
            started = entry.started_at if entry.started_at is not None else entry.queued_at
            with_prefill = entry.request.decoder_input_details
            for event in generation_events(generation, with_prefill, entry.queued_at, started):
                entry.sink.put_nowait(event)
            if generation.generated_text is not None:
                self._finish(entries.pop(entry.id), None)
        for entry_id in [i for i, e in entries.items() if e.cancelled]:
            self._finish(entries.pop(entry_id), None)

    async def _filter(
        self, batch: CachedBatch | None, entries: Entries
    ) -> CachedBatch | None:
        """Tell the shards which requests are still wanted; None when nothing is left."""
        if batch is None:
            # The shards hold nothing more; a request still here would otherwise wait forever.
            self._fail(entries, IncompleteGenerationError("the shard ended the request early"))
            return None
        try:
            if not entries:
                await self._client.clear_cache(batch.id)
                return None
            if set(batch.request_ids) != entries.keys():
                return await self._client.filter_batch(batch.id, list(entries))
        except Exception as err:  # noqa: BLE001 - the shard state is unknown: fail this batch
            log.error("filtering batch %d failed: %s", batch.id, err)
            self._healthy = False
            await self._best_effort_clear(batch.id)
            self._fail(entries, err if isinstance(err, GenerationError)
                       else GenerationError(SHARD_FAILED))
            return None
        return batch

    def _fail(self, entries: Entries, error: InferError) -> None:
        for entry in entries.values():
            self._finish(entry, error)
        entries.clear()

    def _finish(self, entry: Entry, error: InferError | None) -> None:
        """The entry leaves the batch: free its blocks and tell its consumer why, if it waits."""
        if entry.allocation is not None:
            self.allocator.free(entry.allocation)
            entry.allocation = None
        if entry.cancelled:
            self._observer.on_request_dropped()
        elif error is not None:
            # A fresh instance per consumer: each raise writes its own traceback into it.
            entry.sink.put_nowait(type(error)(*error.args))

    def _on_queue_drop(self, entry: Entry) -> None:
        self._observer.on_request_dropped()

    async def _best_effort_clear(self, batch_id: int | None) -> None:
        try:
            await self._client.clear_cache(batch_id)
        except Exception as err:  # noqa: BLE001 - already on an error path
            log.error("ClearCache(%s) failed: %s", batch_id, err)

    def _report_blocks(self) -> None:
        self._observer.on_blocks(self.allocator.used_blocks, self.allocator.total_blocks)
