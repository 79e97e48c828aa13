"""One choice's decoding state machine: token events in, text deltas out, stop strings cut."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from tgserve.router.types import FinishReason, Token


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token, its log-probability (None: not computed) and the alternatives."""

    text: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()
    prompt: bool = False  # a prompt position (echo), not a generated one


@dataclass(frozen=True)
class Delta:
    """What one event adds to a choice; the joined deltas are the whole choice."""

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


def token_logprob(token: Token, top: Sequence[Token] = (), prompt: bool = False) -> TokenLogprob:
    alternatives = tuple((t.text, t.logprob) for t in top if t.logprob is not None)
    alternatives = tuple((text, lp) for text, lp in alternatives if not math.isnan(lp))
    return TokenLogprob(token.text, _finite(token.logprob), alternatives, prompt)


def openai_finish_reason(reason: FinishReason) -> str:
    # OpenAI has no eos_token / stop_sequence: both are "stop".
    return "length" if reason == FinishReason.LENGTH else "stop"


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


@dataclass
class ChoiceDecoder:
    """Turns a request's events into deltas; streaming sends them, non-streaming joins them.

    Text is held back while it could be the start of a stop string, and cut at the first stop
    string found anywhere in the output (the shard only notices stops that end its text). Special
    tokens add no text. `discard_generated` serves `max_tokens=0`: only the echo is returned.
    """

    stops: tuple[str, ...] = ()
    want_logprobs: bool = False
    discard_generated: bool = False
    text: str = ""
    released: int = 0
    completion_tokens: int = 0
    logprob_sum: float = 0.0
    finish_reason: str | None = None
    _stop_scan_from: int = field(default=0, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def mean_logprob(self) -> float:
        return self.logprob_sum / self.completion_tokens if self.completion_tokens else -math.inf

    def echo(
        self,
        text: str,
        prompt_tokens: Sequence[Token] = (),
        prompt_tops: Sequence[Sequence[Token]] = (),
    ) -> Delta:
        """The prompt itself, first in the choice (completions' `echo`); `prompt_tops` are each
        prompt position's alternatives, when the shard computed them."""
        tops = list(prompt_tops) + [[]] * (len(prompt_tokens) - len(prompt_tops))
        entries = tuple(token_logprob(t, top, prompt=True) for t, top in zip(prompt_tokens, tops))
        self.text += text
        self.released = len(self.text)
        self._stop_scan_from = len(self.text)  # a stop inside the prompt does not count
        return Delta(text, entries if self.want_logprobs else ())

    def step(self, token: Token, top: Sequence[Token], end: FinishReason | None) -> Delta:
        """One generated token; `end` is set on the request's last event."""
        if self.done:
            return Delta()
        if self.discard_generated:
            self.finish_reason = "length"
            return Delta(finish_reason="length")
        self.completion_tokens += 1
        self.logprob_sum += _finite(token.logprob) or 0.0
        entries = (token_logprob(token, top),) if self.want_logprobs and not token.special else ()
        if not token.special:
            self.text += token.text
        cut = self._find_stop()
        if cut is not None:
            self.text = self.text[:cut]
            self.finish_reason = "stop"
        elif end is not None:
            self.finish_reason = openai_finish_reason(end)
        keep = 0 if self.done else _held_back(self.text[self.released :], self.stops)
        upto = len(self.text) - keep
        delta = Delta(self.text[self.released : upto], entries, self.finish_reason)
        self.released = upto
        return delta

    def _find_stop(self) -> int | None:
        """Where the earliest stop string starts in the text not yet scanned for one."""
        found = [i for i in (self.text.find(s, self._stop_scan_from) for s in self.stops) if i >= 0]
        longest = max((len(s) for s in self.stops), default=1)
        # A later token may complete a stop that starts up to (longest - 1) characters back.
        self._stop_scan_from = max(self._stop_scan_from, len(self.text) - longest + 1, 0)
        return min(found) if found else None
