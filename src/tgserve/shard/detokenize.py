"""Incremental detokenization: the new text each generated token adds, never half a character."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# Decode again from a few tokens back so that merges and leading-space rules see context.
_PREFIX_WINDOW = 5
_REPLACEMENT_CHAR = "\ufffd"


def decode_token(
    tokenizer: Any,
    all_ids: Sequence[int],
    prefix_offset: int,
    read_offset: int,
    skip_special_tokens: bool = False,
) -> tuple[str, int, int]:
    """The text all_ids[read_offset:] adds after all_ids[prefix_offset:read_offset].

    Returns (new text, prefix_offset, read_offset) for the next call. Text is held back (""
    returned, offsets kept) while it ends in U+FFFD, i.e. a multi-byte character is unfinished,
    or while the new tokens add nothing yet.
    """
    # Slices only: copying all_ids would cost O(sequence length) per generated token.
    prefix_ids = list(all_ids[prefix_offset:read_offset])
    prefix_text = tokenizer.decode(prefix_ids, skip_special_tokens=skip_special_tokens)
    full_ids = list(all_ids[prefix_offset:])
    full_text = tokenizer.decode(full_ids, skip_special_tokens=skip_special_tokens)
    if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT_CHAR):
        return full_text[len(prefix_text) :], read_offset, len(all_ids)
    return "", prefix_offset, read_offset


class IncrementalDetokenizer:
    """Streams one request's generated text, token by token, after its prompt."""

    def __init__(
        self, tokenizer: Any, prompt_ids: Sequence[int], skip_special_tokens: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.all_ids: list[int] = list(prompt_ids)
        self.prefix_offset = max(len(self.all_ids) - _PREFIX_WINDOW, 0)
        self.read_offset = len(self.all_ids)

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is unfinished)."""
        self.all_ids.append(int(token_id))
        text, self.prefix_offset, self.read_offset = decode_token(
            self.tokenizer,
            self.all_ids,
            self.prefix_offset,
            self.read_offset,
            self.skip_special_tokens,
        )
        return text
