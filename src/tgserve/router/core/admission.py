"""Deadline admission: when would a new request get its first token, at the pace steps run now?

A request may carry a deadline for its first token (the X-Request-Timeout header, or the
launcher's --request-timeout). TGI queues every request until the client gives up; here one that
the queue ahead of it makes late is refused at once with a Retry-After, so that it can go to
another replica while it still has time, and the requests already queued keep their latency.

The estimate is deliberately simple: the prompt tokens waiting ahead, plus its own, at the
measured prefill rate, plus one decode step of the running batch per step it takes to admit
them (with mixed prefill every admission step also decodes the running rows). It is refused only
when that exceeds what is left of its deadline: without measurements yet, nothing is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Weight of the newest step in the moving averages: a few steps adapt it to a new load.
PACE_WEIGHT = 0.2


def _moving(average: float | None, value: float) -> float:
    return value if average is None else (1 - PACE_WEIGHT) * average + PACE_WEIGHT * value


@dataclass
class StepPace:
    """Moving averages of recent steps: seconds per computed prompt token, seconds per decode."""

    prefill_s_per_token: float | None = None
    decode_step_s: float | None = None

    def on_prefill(self, seconds: float, computed_tokens: int) -> None:
        if computed_tokens > 0 and seconds >= 0:
            self.prefill_s_per_token = _moving(self.prefill_s_per_token, seconds / computed_tokens)

    def on_decode(self, seconds: float) -> None:
        if seconds >= 0:
            self.decode_step_s = _moving(self.decode_step_s, seconds)

    def first_token_eta(
        self, tokens_ahead: int, own_tokens: int, step_tokens: int, running: bool
    ) -> float | None:
        """Seconds until a request queued now gets its first token; None before any prefill."""
        if self.prefill_s_per_token is None:
            return None
        tokens = tokens_ahead + own_tokens
        eta = tokens * self.prefill_s_per_token
        if running and self.decode_step_s is not None:
            eta += math.ceil(tokens / max(step_tokens, 1)) * self.decode_step_s
        return eta


@dataclass(frozen=True)
class Admission:
    """The verdict on a request with a deadline: admitted, or refused with when to come back."""

    admitted: bool
    eta: float | None = None  # seconds to its first token, as estimated
    retry_after: float = 0.0  # seconds until the queue ahead of it has drained, as estimated


def admit(pace: StepPace, remaining: float, tokens_ahead: int, own_tokens: int,
          step_tokens: int, running: bool) -> Admission:
    """Refuse only a request whose estimated first token comes after its deadline."""
    eta = pace.first_token_eta(tokens_ahead, own_tokens, step_tokens, running)
    if eta is None or eta <= remaining:
        return Admission(True, eta)
    ahead = pace.first_token_eta(tokens_ahead, 0, step_tokens, running) or 0.0
    return Admission(False, eta, retry_after=max(ahead, 1.0))
