"""The ops table that models and layers call, chosen once at model load: C++ or torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tgserve.shard.kernels import build, cpu_ops, torch_ops


@dataclass(frozen=True)
class KernelOps:
    """One implementation of every op the layers call, given to each layer at load time.

    Every implementation takes every tensor: the C++ entries hand what their kernels do not take
    (another dtype or device, a strided row, a long prompt) to the torch twin, so no layer asks
    which implementation it has. A CUDA implementation would be a third instance.
    """

    name: str
    # weight * x / sqrt(mean(x²) + eps) per row: (x, weight, eps) -> normed
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    # (x, residual, weight, eps) -> (rms_norm(x + residual), x + residual)
    add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ]
    # [T, 2I] -> [T, I]: silu(first half) * second half
    silu_mul: Callable[[torch.Tensor], torch.Tensor]
    # (weight [N, K], bias) -> the weight in the layout packed_linear multiplies, or None when
    # this implementation multiplies the plain weight with F.linear
    pack_linear: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None]
    # (x [M, K], packed, N, bias) -> x·Wᵀ (+ bias) [M, N]
    packed_linear: Callable[
        [torch.Tensor, torch.Tensor, int, torch.Tensor | None], torch.Tensor
    ]
    # (ids, packed, N) -> W[ids]: a tied embedding read from its LM head's packed weight
    packed_rows: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
    # (qkv [T, (H + 2 Hkv) D], cos, sin [T, 1, D], k_cache, v_cache, slots, H, Hkv, D) ->
    # (q, k, v with RoPE on q and k, whether k and v are already written to the cache)
    rotary_qkv: Callable[
        ..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]
    ]
    # (q [B, H, D], k_cache, v_cache, meta, scale, window) -> [B, H, D] over each decode row's
    # cached context
    decode_attention: Callable[..., torch.Tensor]
    # (out, q, k, v, k_cache, v_cache, sequences, scale, window): causal attention of each new
    # prompt (over its cached prefix too), into its rows of out
    prefill_attention: Callable[..., None]
    # scores [B, V] -> (argmax, its log-probability, the [B, V] log-probabilities or None when
    # they were not made)
    greedy: Callable[
        [torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
    ]
    # A whole Llama-shaped decode layer in one op (arguments: cpu_ops.llama_decode_layer) ->
    # (out, residual), or None: the layer then runs op by op
    llama_decode_layer: Callable[..., tuple[torch.Tensor, torch.Tensor] | None]


def _table(name: str, module: Any) -> KernelOps:
    return KernelOps(
        name=name,
        rms_norm=module.rms_norm,
        add_rms_norm=module.add_rms_norm,
        silu_mul=module.silu_mul,
        pack_linear=module.pack_linear,
        packed_linear=module.packed_linear,
        packed_rows=module.packed_rows,
        rotary_qkv=module.rotary_qkv,
        decode_attention=module.decode_attention,
        prefill_attention=module.prefill_attention,
        greedy=module.greedy,
        llama_decode_layer=module.llama_decode_layer,
    )


TORCH_OPS = _table("torch", torch_ops)
# Only for a process whose kernels built (build.available()): its entries call them unchecked.
CPU_OPS = _table("cpu", cpu_ops)


def select_ops(device: torch.device | str) -> KernelOps:
    """The C++ ops on a CPU where the kernels build and load (for this CPU's instruction set,
    build.built_capability()), torch otherwise. The first call on a CPU may build them (tens of
    seconds): model load, not the first request, pays for it."""
    if torch.device(device).type == "cpu" and build.available():
        return CPU_OPS
    return TORCH_OPS
