"""Attention through torch's scaled_dot_product_attention: per-sequence causal prefill, gathered decode."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tgserve.shard.kernels import attention as cpu_attention
from tgserve.shard.kv_cache import KVCache
from tgserve.shard.layers.attention.metadata import AttentionMetadata, PrefillSequence
from tgserve.shard.layers.fused import cpu_kernels_fit, cpu_kernels_fit_cache


def sdpa_attention(
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
        return _decode(q, kv_cache, layer, meta, scale, window)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = _decode(q[:nd], kv_cache, layer, meta, scale, window)
    _prefill(out, q, k, v, kv_cache, layer, meta.prefill, scale, window)
    return out


def _prefill(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: KVCache,
    layer: int,
    sequences: list[PrefillSequence],
    scale: float,
    window: int | None,
) -> None:
    """Fills the rows of `out` that belong to new prompts."""
    own = _own_kernel_sequences(q, k, v, sequences)
    if own:
        starts = torch.tensor([s.start for s in own], dtype=torch.long)
        lengths = torch.tensor([s.length for s in own], dtype=torch.long)
        cpu_attention.prefill_attention(out, q, k, v, starts, lengths, scale, window or 0)
    taken = {id(s) for s in own}
    for seq in sequences:
        if id(seq) in taken:
            continue
        rows = slice(seq.start, seq.start + seq.length)
        qs = q[rows].transpose(0, 1)  # [H, n, D]
        if seq.cache_len == 0:
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # [Hkv, n, D]
        else:
            assert seq.kv_slots is not None
            # [Hkv, c+n, D], in q's dtype whatever the cache's (--kv-cache-dtype)
            ks = kv_cache.keys[layer].index_select(0, seq.kv_slots).to(q.dtype).transpose(0, 1)
            vs = kv_cache.values[layer].index_select(0, seq.kv_slots).to(q.dtype).transpose(0, 1)
        # Batched 4-d inputs with the kv heads repeated: torch's CPU flash kernel takes those
        # (about 3x faster than the math path that enable_gqa or 3-d inputs fall back to).
        group = qs.shape[0] // ks.shape[0]
        if group > 1:
            ks, vs = ks.repeat_interleave(group, dim=0), vs.repeat_interleave(group, dim=0)
        qs, ks, vs = qs.unsqueeze(0), ks.unsqueeze(0), vs.unsqueeze(0)
        if seq.cache_len == 0 and window is None:
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        else:
            mask = _causal_mask(seq.length, seq.cache_len, window, q.device)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
        out[rows] = o[0].transpose(0, 1)


def _own_kernel_sequences(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sequences: list[PrefillSequence],
) -> list[PrefillSequence]:
    """The prompts the C++ prefill kernel takes: no cached prefix, short enough, float32 on CPU.

    It runs short prompts 2-3x faster than torch's flash kernel (prefill_attention.cpp); prompts
    that continue a cached prefix read their K/V back from the cache and stay on the torch path.
    """
    if not cpu_kernels_fit(q, k, v):
        return []
    max_length, dim_multiple = cpu_attention.prefill_attention_limits()
    dim = q.shape[-1]
    if dim % dim_multiple or any(t.stride(-1) != 1 or t.stride(-2) != dim for t in (q, k, v)):
        return []
    return [s for s in sequences if s.cache_len == 0 and s.length <= max_length]


def _causal_mask(n: int, cache_len: int, window: int | None, device: torch.device) -> torch.Tensor:
    q_pos = torch.arange(cache_len, cache_len + n, device=device)[:, None]
    kv_pos = torch.arange(cache_len + n, device=device)[None, :]
    mask = kv_pos <= q_pos
    if window is not None:
        mask &= kv_pos > q_pos - window
    return mask


def _gather(cache: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # index_select on the flat slot axis is several times faster than advanced indexing on CPU.
    b, length = index.shape
    rows = cache.index_select(0, index.reshape(-1))
    return rows.view(b, length, *cache.shape[1:]).transpose(1, 2)


def _decode(
    q: torch.Tensor,
    kv_cache: KVCache,
    layer: int,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    assert meta.kv_index is not None and meta.kv_lengths is not None
    keys, values = kv_cache.keys[layer], kv_cache.values[layer]
    if cpu_kernels_fit(q) and cpu_kernels_fit_cache(keys):
        # Reads K/V in place through the slot index: no per-layer copy of every row's context.
        return cpu_attention.paged_decode_attention(
            q, keys, values, meta.kv_index, meta.kv_lengths, scale, window or 0
        )
    keys = _gather(keys, meta.kv_index).to(q.dtype)  # [B, Hkv, L, D]
    values = _gather(values, meta.kv_index).to(q.dtype)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, D]
        keys,
        values,
        attn_mask=meta.decode_mask(window),
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(2)  # [B, H, D]
