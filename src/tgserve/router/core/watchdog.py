"""The engine watchdog: a shard step that takes far longer than recent steps of its kind and size.

A hung kernel or a deadlocked collective leaves the batching task awaiting one step forever: no
error reaches any request, and a health RPC would queue behind the step. The watchdog compares
the step in flight with the recent steps of the same method and size bucket (powers of two of
the tokens it computes); one past `factor` times the slowest of those, and at least `floor_s`,
is a stall: the server turns unhealthy (so that an orchestrator restarts it, or a balancer stops
sending it requests) and the log names the step and its requests. A step of a size never seen
before is judged against `unknown_s` only. The server turns healthy again if the step finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

log = logging.getLogger("tgserve.router.watchdog")


@dataclass(frozen=True)
class WatchdogSettings:
    factor: float = 20.0
    floor_s: float = 10.0
    unknown_s: float = 300.0
    history: int = 32  # recent steps remembered per bucket
    interval_s: float = 0.5  # how often the step in flight is looked at


@dataclass(frozen=True)
class StepWatch:
    """What one step is: for the bucket it is compared in, and for the log when it stalls."""

    method: str  # prefill or decode
    tokens: int  # computed prompt tokens (prefill) or rows (decode)
    request_ids: tuple[int, ...]
    batch_ids: tuple[int, ...]

    @property
    def bucket(self) -> tuple[str, int]:
        return self.method, max(self.tokens, 1).bit_length()


@dataclass(frozen=True)
class Stall:
    step: StepWatch
    since: float  # when the step started (clock)
    limit: float  # seconds it was allowed


@dataclass
class Watchdog:
    settings: WatchdogSettings = field(default_factory=WatchdogSettings)
    clock: Callable[[], float] = time.monotonic
    stalled: Stall | None = None
    _recent: dict[tuple[str, int], deque[float]] = field(default_factory=dict, repr=False)
    _step: StepWatch | None = field(default=None, repr=False)
    _started: float = field(default=0.0, repr=False)

    def limit(self, step: StepWatch) -> float:
        """Seconds `step` may take before it counts as stalled."""
        method, bits = step.bucket
        # The bucket itself, or else the nearest bigger one: a smaller step is no slower.
        for b in range(bits, 64):
            recent = self._recent.get((method, b))
            if recent:
                return max(self.settings.factor * max(recent), self.settings.floor_s)
        return max(self.settings.unknown_s, self.settings.floor_s)

    @contextmanager
    def watching(self, step: StepWatch) -> Iterator[None]:
        """Wrap one step's RPC; its duration joins the history if it succeeds."""
        self._step, self._started = step, self.clock()
        ok = False
        try:
            yield
            ok = True
        finally:
            elapsed = self.clock() - self._started
            self._step = None
            if ok:
                recent = self._recent.setdefault(step.bucket, deque(maxlen=self.settings.history))
                recent.append(elapsed)
            if self.stalled is not None:
                log.warning("the stalled %s step ended after %.1fs (%s)", step.method, elapsed,
                            "done" if ok else "failed")
                self.stalled = None

    def check(self) -> Stall | None:
        """Judge the step in flight now; logs a new stall once."""
        step = self._step
        if step is None or self.stalled is not None:
            return self.stalled
        elapsed = self.clock() - self._started
        limit = self.limit(step)
        if elapsed > limit:
            self.stalled = Stall(step, self._started, limit)
            log.error(
                "engine stalled: a %s step of %d %s (batch %s) has run %.1fs, past its limit of "
                "%.1fs from recent steps of its size; marking the server unhealthy. Requests in "
                "it: %s", step.method, step.tokens,
                "prompt tokens" if step.method == "prefill" else "rows",
                ", ".join(map(str, step.batch_ids)), elapsed, limit,
                ", ".join(map(str, step.request_ids)) or "none",
            )
        return self.stalled

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.interval_s)
            self.check()
