"""Normalization layers: RMSNorm (Llama family) and LayerNorm (GPT-2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgserve.shard.kernels import KernelOps
from tgserve.shard.loading.weights import Weights


@dataclass
class RMSNorm:
    weight: torch.Tensor
    eps: float
    kernels: KernelOps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a block's residual add fused with the next norm."""
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps)


@dataclass
class LayerNorm:
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def load_rms_norm(
    weights: Weights, prefix: str, eps: float, kernels: KernelOps, offset: float = 0.0
) -> RMSNorm:
    """`offset`: the checkpoint holds the scale less `offset` (Gemma stores w and scales by 1 + w).
    The sum is taken once here, in float32 as the reference does, and kept in float32: the ops then
    round the product to the serving dtype, not the normed input (kernels.torch_ops.rms_norm)."""
    weight = weights.get_tensor(f"{prefix}.weight")
    if offset:
        weight = weight.float() + offset
    return RMSNorm(weight, eps, kernels)


def load_layer_norm(weights: Weights, prefix: str, eps: float) -> LayerNorm:
    bias = weights.get_tensor(f"{prefix}.bias") if weights.has(f"{prefix}.bias") else None
    return LayerNorm(weights.get_tensor(f"{prefix}.weight"), bias, eps)
