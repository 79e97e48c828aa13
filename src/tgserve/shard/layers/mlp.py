"""Feed-forward blocks: gated (SwiGLU, Llama family) and plain (GPT-2)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgserve.shard.kernels import KernelOps
from tgserve.shard.layers.linear import Linear, RowLinear, load_column, load_row
from tgserve.shard.loading.weights import Weights


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "silu":
        return F.silu
    # Reuse transformers' definitions so exotic activations match the reference bit for bit. Only
    # here: the module brings torch.distributed.tensor and sympy, which would stay resident.
    from transformers.activations import ACT2FN

    return ACT2FN[name]


@dataclass
class GatedMLP:
    gate_up: Linear  # fused [2 * intermediate / world, hidden]
    down: RowLinear
    act: Callable[[torch.Tensor], torch.Tensor]
    kernels: KernelOps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if self.act is F.silu:
            return self.down(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(self.act(gate) * up)


def load_gated_mlp(
    weights: Weights, prefix: str, act: str, kernels: KernelOps, bias: bool = False
) -> GatedMLP:
    gate_up = load_column(weights, [f"{prefix}.gate_proj", f"{prefix}.up_proj"], bias, kernels)
    down = load_row(weights, f"{prefix}.down_proj", bias, kernels)
    return GatedMLP(gate_up, down, activation(act), kernels)


@dataclass
class PlainMLP:
    up: Linear
    down: RowLinear
    act: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))
