"""The C++ attention kernels: paged decode over the KV cache, causal prefill of new prompts."""

from __future__ import annotations

import functools

import torch

from tgserve.shard.kernels.build import library


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v over each row's cached context, read in place through the slot index.

    q: [B, H, D] float32; k_cache/v_cache: [N, Hkv, D], both float32 or both float16;
    kv_index: [B, L] int64 slots, of which row b uses the first lengths[b]; window > 0 keeps
    only each row's last `window` positions.
    Returns [B, H, D]; a row with length 0 gives zeros.
    """
    return library().paged_decode_attention(q, k_cache, v_cache, kv_index, lengths, scale, window)


def prefill_attention(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int = 0,
) -> None:
    """Causal attention of each new prompt over its own tokens, into `out` [T, H, D] in place.

    q: [T, H, D], k/v: [T, Hkv, D] float32 (rows may be strided, e.g. views of the fused QKV
    projection); sequence i is rows starts[i] .. starts[i] + lengths[i] (int64 [S]), none longer
    than prefill_attention_limits()[0], head dim a multiple of its [1]; window > 0 keeps each
    position's last `window` keys. Rows outside every sequence are left as they are.
    """
    library().prefill_attention(out, q, k, v, starts, lengths, scale, window)


@functools.cache
def prefill_attention_limits() -> tuple[int, int]:
    """(longest sequence, head-dim multiple) that prefill_attention takes; anything else keeps
    torch's flash kernel, whose blocking suits long prompts anyway."""
    max_length, dim_multiple = library().prefill_attention_limits()
    return int(max_length), int(dim_multiple)
