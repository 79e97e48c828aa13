"""The C++ ops: tensors their kernels take (float32 on CPU) go to them, the rest to torch_ops."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tgserve.shard.kernels import attention, decode_layer, fused, linear, torch_ops
from tgserve.shard.kernels import greedy as greedy_kernel

if TYPE_CHECKING:
    from tgserve.shard.layers.attention.metadata import AttentionMetadata, PrefillSequence

# Below this many weights a linear is too small for packing to matter; it stays with torch.
_MIN_PACKED_WEIGHTS = 1 << 12
# What the kernels read and write a KV cache in: float32, or float16 widened as it is loaded.
KERNEL_KV_DTYPES = (torch.float32, torch.float16)


def fits(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a float32 CPU tensor outside autograd.

    Anything else (CUDA, half precision, a backward pass) takes the torch path, which is also the
    reference the kernels are tested against.
    """
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.requires_grad:
            return False
    return True


def fits_cache(cache: torch.Tensor) -> bool:
    """True when the kernels may read and write this layer's K or V cache."""
    return cache.device.type == "cpu" and cache.dtype in KERNEL_KV_DTYPES


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dim() == 2 and x.stride(-1) == 1 and fits(x, weight):
        return fused.rms_norm(x, weight, eps)
    return torch_ops.rms_norm(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        x.dim() == 2
        and x.stride(-1) == 1
        and residual.stride(-1) == 1
        and fits(x, residual, weight)
    ):
        return fused.add_rms_norm(x, residual, weight, eps)
    return torch_ops.add_rms_norm(x, residual, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.dim() == 2 and fits(gate_up):
        return fused.silu_mul(gate_up)
    return torch_ops.silu_mul(gate_up)


def packs(weight: torch.Tensor) -> bool:
    """Whether a weight goes to the packed kernel (float32 on CPU, big enough to matter)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.numel() >= _MIN_PACKED_WEIGHTS
        and not weight.requires_grad
    )


def pack_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The panels packed_linear multiplies at every batch size, decode (bound by streaming W) and
    prefill alike; None leaves the weight to F.linear."""
    if packs(weight) and (bias is None or bias.dtype == torch.float32):
        return linear.pack_linear_weight(weight)
    return None


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None
) -> torch.Tensor:
    return linear.packed_linear(x, packed, n, bias)


def packed_rows(ids: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    return linear.packed_rows(ids, packed, n)


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
    """RoPE in place and the KV write, in one pass: (views of qkv, True)."""
    if not (cos.shape[-1] == dim and fits(qkv, cos) and fits_cache(k_cache)):
        return torch_ops.rotary_qkv(qkv, cos, sin, k_cache, v_cache, slots, heads, kv_heads, dim)
    fused.rotary_store_kv(
        qkv, cos.view(-1, dim), sin.view(-1, dim), k_cache, v_cache, slots, heads, kv_heads, dim
    )
    q, k, v = torch_ops.split_heads(qkv, heads, kv_heads, dim)
    return q, k, v, True


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    if fits(q) and fits_cache(k_cache):
        # Reads K/V in place through the slot index: no per-layer copy of every row's context.
        assert meta.kv_index is not None and meta.kv_lengths is not None
        return attention.paged_decode_attention(
            q, k_cache, v_cache, meta.kv_index, meta.kv_lengths, scale, window or 0
        )
    return torch_ops.decode_attention(q, k_cache, v_cache, meta, scale, window)


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
    own = _own_kernel_sequences(q, k, v, sequences)
    if own:
        starts = torch.tensor([s.start for s in own], dtype=torch.long)
        lengths = torch.tensor([s.length for s in own], dtype=torch.long)
        attention.prefill_attention(out, q, k, v, starts, lengths, scale, window or 0)
        taken = {id(s) for s in own}
        sequences = [s for s in sequences if id(s) not in taken]
    torch_ops.prefill_attention(out, q, k, v, k_cache, v_cache, sequences, scale, window)


def _own_kernel_sequences(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sequences: list[PrefillSequence],
) -> list[PrefillSequence]:
    """The prompts the C++ prefill kernel takes: no cached prefix, short enough, float32 on CPU.

    It is faster than torch's flash kernel on short prompts (docs/design/prefill-attention.md);
    prompts that continue a cached prefix read their K/V back from the cache and stay on the torch
    path.
    """
    if not fits(q, k, v):
        return []
    max_length, dim_multiple = attention.prefill_attention_limits()
    dim = q.shape[-1]
    if dim % dim_multiple or any(t.stride(-1) != 1 or t.stride(-2) != dim for t in (q, k, v)):
        return []
    return [s for s in sequences if s.cache_len == 0 and s.length <= max_length]


def greedy(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Without the [B, V] log-probabilities, which the chooser makes only if asked for them."""
    if fits(scores):
        ids, logprobs = greedy_kernel.greedy_choice(scores)
        return ids, logprobs, None
    return torch_ops.greedy(scores)


def llama_decode_layer(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    input_norm: torch.Tensor,
    post_norm: torch.Tensor,
    eps: float,
    qkv: torch.Tensor | None,
    qkv_bias: torch.Tensor | None,
    o: torch.Tensor | None,
    o_bias: torch.Tensor | None,
    gate_up: torch.Tensor | None,
    gate_up_bias: torch.Tensor | None,
    down: torch.Tensor | None,
    down_bias: torch.Tensor | None,
    intermediate: int,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    kv_index: torch.Tensor | None,
    kv_lengths: torch.Tensor | None,
    heads: int,
    kv_heads: int,
    dim: int,
    window: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The whole layer in one op when all four linears are packed and the tensors fit; None
    (the layer runs op by op) otherwise."""
    if (
        qkv is None
        or o is None
        or gate_up is None
        or down is None
        or cos.shape[-1] != dim
        or not fits(hidden)
        or not fits_cache(k_cache)
    ):
        return None
    return decode_layer.llama_decode_layer(
        hidden, residual, input_norm, post_norm, eps, qkv, qkv_bias, o, o_bias, gate_up,
        gate_up_bias, down, down_bias, intermediate, cos.view(-1, dim), sin.view(-1, dim),
        k_cache, v_cache, slots, kv_index, kv_lengths, heads, kv_heads, dim, window, scale,
    )  # fmt: skip
