"""The C++ fused element-wise ops: RMSNorm, residual add + RMSNorm, SwiGLU, RoPE + KV store."""

from __future__ import annotations

import torch

from tgserve.shard.kernels.build import library


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x²) + eps) per row of x [T, hidden] (float32, unit-stride rows)."""
    return library().rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over the rows."""
    normed, total = library().add_rms_norm(x, residual, weight, eps)
    return normed, total


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(first half) * second half."""
    return library().silu_mul(gate_up)


def rotary_store_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    heads: int,
    kv_heads: int,
    dim: int,
) -> None:
    """In place on qkv [T, (H + 2 Hkv) D]: rotate-half RoPE of the q and k heads (cos/sin [T, D]);
    then each token's k and v go to its slot of k_cache/v_cache [N, Hkv, D] (float32, or float16
    rounded to nearest as torch rounds)."""
    library().rotary_store_kv(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads, dim)
