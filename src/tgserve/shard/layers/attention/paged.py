"""Attention of a forward's new tokens: K/V into the cache, then decode rows and prompts via ops."""

from __future__ import annotations

import torch

from tgserve.shard.kernels import KernelOps
from tgserve.shard.kv_cache import KVCache
from tgserve.shard.layers.attention.metadata import AttentionMetadata


def paged_attention(
    kernels: KernelOps,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    kv_stored: bool = False,
) -> torch.Tensor:
    """q: [T, H, D], k/v: [T, Hkv, D] for the new tokens (already in the cache if kv_stored).
    Returns [T, H, D]."""
    if not kv_stored:
        kv_cache.write(layer, meta.slots, k, v)
    nd = meta.num_decode
    if meta.prefill is None:
        return _decode(kernels, q, kv_cache, layer, meta, scale, window)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode(kernels, q[:nd], kv_cache, layer, meta, scale, window)
    keys, values = kv_cache.keys[layer], kv_cache.values[layer]
    kernels.prefill_attention(out, q, k, v, keys, values, meta.prefill, scale, window)
    return out


def _decode(
    kernels: KernelOps,
    q: torch.Tensor,
    kv_cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    keys, values = kv_cache.keys[layer], kv_cache.values[layer]
    return kernels.decode_attention(q, keys, values, meta, scale, window)
