"""The torch implementation of every kernel op: any device and dtype, and the kernels' reference."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from tgserve.shard.layers.attention.metadata import AttentionMetadata, PrefillSequence


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Statistics in float32 whatever the serving dtype, as the reference implementations do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight.dtype != x.dtype:
        # A float32 weight on a half-precision model (Gemma's 1 + w, layers/norm.py): Gemma's
        # reference scales in float32 and rounds the product, where Llama's rounds before scaling.
        return (weight * xf).to(x.dtype)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    total = x + residual
    return rms_norm(total, weight, eps), total


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """torch multiplies the plain [out, in] weight (F.linear): nothing is packed."""
    return None


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    raise TypeError("packed weights come from the C++ ops' pack_linear; torch packs none")


def packed_rows(ids: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    raise TypeError("packed weights come from the C++ ops' pack_linear; torch packs none")


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] (rotate-half convention of Hugging Face checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def split_heads(
    qkv: torch.Tensor, heads: int, kv_heads: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views [T, H, D], [T, Hkv, D], [T, Hkv, D] of the fused projection [T, (H + 2 Hkv) D]."""
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return q.view(-1, heads, dim), k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim)


def rotary_qkv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    heads: int,
    kv_heads: int,
    dim: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(q, k, v, False): RoPE on new tensors; the cache is left to the attention to write."""
    q, k, v = split_heads(qkv, heads, kv_heads, dim)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, False


def prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sequences: list[PrefillSequence],
    scale: float,
    window: int | None,
) -> None:
    """Fills the rows of `out` that belong to new prompts, one SDPA call per prompt."""
    for seq in sequences:
        rows = slice(seq.start, seq.start + seq.length)
        qs = q[rows].transpose(0, 1)  # [H, n, D]
        if seq.cache_len == 0:
            ks, vs = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # [Hkv, n, D]
        else:
            assert seq.kv_slots is not None
            # [Hkv, c+n, D], in q's dtype whatever the cache's (--kv-cache-dtype)
            ks = k_cache.index_select(0, seq.kv_slots).to(q.dtype).transpose(0, 1)
            vs = v_cache.index_select(0, seq.kv_slots).to(q.dtype).transpose(0, 1)
        # Batched 4-d inputs with the kv heads repeated: torch's CPU flash kernel takes those,
        # where enable_gqa or 3-d inputs fall back to the much slower math path.
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


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Each decode row's context gathered from the cache, then masked SDPA. Returns [B, H, D]."""
    assert meta.kv_index is not None and meta.kv_lengths is not None
    keys = _gather(k_cache, meta.kv_index).to(q.dtype)  # [B, Hkv, L, D]
    values = _gather(v_cache, meta.kv_index).to(q.dtype)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # [B, H, 1, D]
        keys,
        values,
        attn_mask=meta.decode_mask(window),
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(2)  # [B, H, D]


def greedy(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmax, its log-probability, the [B, V] log-probabilities it was read from)."""
    all_logprobs = torch.log_softmax(scores, dim=-1, dtype=torch.float32)
    next_ids = scores.argmax(dim=-1)
    logprobs = all_logprobs.gather(1, next_ids.unsqueeze(-1)).squeeze(-1)
    return next_ids, logprobs, all_logprobs


def llama_decode_layer(*args: Any) -> None:
    """torch has no one-op layer: the layer runs op by op."""
    return None
