"""Attention backends by name; GPU kernels plug in here without touching the models."""

from __future__ import annotations

from collections.abc import Callable

from tgserve.shard.layers.attention.sdpa import sdpa_attention

AttentionFn = Callable[..., object]

_BACKENDS: dict[str, AttentionFn] = {"sdpa": sdpa_attention}


def get_backend(name: str) -> AttentionFn:
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)}")
    return _BACKENDS[name]
