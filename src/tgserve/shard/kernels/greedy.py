"""The C++ greedy choice: argmax and its log-probability without the [B, V] log-softmax."""

from __future__ import annotations

import torch

from tgserve.shard.kernels.build import library


def greedy_choice(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of scores [B, V] float32: (argmax [B] int64, log_softmax at the argmax [B] float32),
    as torch.argmax and log_softmax give them, without the [B, V] log-probabilities."""
    ids, logprobs = library().greedy_choice(scores)
    return ids, logprobs
