"""Everything attention needs to know about a forward, built once a step, shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSequence:
    start: int  # offset of this sequence's new tokens in the flattened batch
    length: int  # new tokens computed in this forward
    cache_len: int  # tokens of this sequence already in the KV cache
    kv_slots: torch.Tensor | None  # [cache_len + length] slots to read when cache_len > 0


@dataclass
class AttentionMetadata:
    """The first `num_decode` tokens are decode rows (one token each, context in the cache); the
    rest are new prompts, flattened without padding (varlen prefill)."""

    slots: torch.Tensor  # [T] where each new token's K/V is written
    positions: torch.Tensor  # [T]
    prefill: list[PrefillSequence] | None = None
    num_decode: int = 0
    # Decode rows: the slots of each row's whole context, right-padded, and which are real.
    kv_index: torch.Tensor | None = None  # [B, L]
    kv_lengths: torch.Tensor | None = None  # [B]
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[B, 1, 1, L] bool: True where a row may attend; cached per window size."""
        if window not in self._masks:
            assert self.kv_index is not None and self.kv_lengths is not None
            kv_pos = torch.arange(self.kv_index.shape[1], device=self.kv_index.device)[None, :]
            mask = kv_pos < self.kv_lengths[:, None]
            if window is not None:
                mask &= kv_pos >= (self.kv_lengths[:, None] - window)
            self._masks[window] = mask[:, None, None, :]
        return self._masks[window]
