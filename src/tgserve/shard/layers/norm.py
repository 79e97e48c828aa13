"""Normalization layers: RMSNorm (Llama family) and LayerNorm (GPT-2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgserve.shard.kernels import fused
from tgserve.shard.layers.fused import cpu_kernels_fit
from tgserve.shard.loading.weights import Weights


@dataclass
class RMSNorm:
    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.stride(-1) == 1 and cpu_kernels_fit(x, self.weight):
            return fused.rms_norm(x, self.weight, self.eps)
        return self.reference(x)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): a block's residual add fused with the next norm."""
        if (
            x.dim() == 2
            and x.stride(-1) == 1
            and residual.stride(-1) == 1
            and cpu_kernels_fit(x, residual, self.weight)
        ):
            return fused.add_rms_norm(x, residual, self.weight, self.eps)
        total = x + residual
        return self.reference(total), total

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the serving dtype, as the reference implementations do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


@dataclass
class LayerNorm:
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def load_rms_norm(weights: Weights, prefix: str, eps: float) -> RMSNorm:
    return RMSNorm(weights.get_tensor(f"{prefix}.weight"), eps)


def load_layer_norm(weights: Weights, prefix: str, eps: float) -> LayerNorm:
    bias = weights.get_tensor(f"{prefix}.bias") if weights.has(f"{prefix}.bias") else None
    return LayerNorm(weights.get_tensor(f"{prefix}.weight"), bias, eps)
