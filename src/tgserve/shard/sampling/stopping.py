"""Per-request stop check after each token: length, then EOS, then stop sequences."""

from __future__ import annotations

from enum import IntEnum

from tgserve.shard.sampling.params import StoppingParams

# TGI looks for stop sequences in the last few hundred characters of output only.
_MIN_TAIL_CHARS = 300


class FinishReason(IntEnum):
    LENGTH = 0
    EOS_TOKEN = 1
    STOP_SEQUENCE = 2


class StoppingCriteria:
    """Counts generated tokens and keeps a bounded tail of the output text to match stops in."""

    def __init__(self, eos_token_ids: frozenset[int], params: StoppingParams) -> None:
        self.eos_token_ids = frozenset(eos_token_ids)
        self.params = params
        self.stop_sequences = tuple(s for s in params.stop_sequences if s)
        longest = max((len(s) for s in self.stop_sequences), default=0)
        # Twice the longest stop, so a stop spanning many small tokens still fits.
        self._tail_limit = max(_MIN_TAIL_CHARS, 2 * longest)
        self._tail = ""
        self.current_tokens = 0

    def __call__(self, token_id: int, text: str) -> FinishReason | None:
        """Account for one generated token and the new text it produced ("" when held back)."""
        self.current_tokens += 1
        if self.current_tokens >= self.params.max_new_tokens:
            return FinishReason.LENGTH
        if not self.params.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.EOS_TOKEN
        if not self.stop_sequences or not text:
            return None  # no new text: had the tail ended with a stop, we would have stopped
        self._tail = (self._tail + text)[-self._tail_limit :]
        if any(_ends_with_stop(self._tail, stop) for stop in self.stop_sequences):
            return FinishReason.STOP_SEQUENCE
        return None


def _ends_with_stop(tail: str, stop: str) -> bool:
    # TGI matches re.escape(stop) + "$", and "$" also matches before one final "\n".
    return tail.endswith(stop) or tail.endswith(stop + "\n")
