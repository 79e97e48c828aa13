"""Dense linear layers split across tensor-parallel ranks (column: outputs, row: inputs + all-reduce)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tgserve.shard.kernels import build
from tgserve.shard.kernels import linear as cpu_linear
from tgserve.shard.loading.weights import Weights

# Below this many weights a linear is too small for packing to matter; it stays with torch.
_MIN_PACKED_WEIGHTS = 1 << 12


@dataclass
class Linear:
    """y = x·Wᵀ (+ bias). On CPU in float32 the weight lives only as panels (`packed`), which the
    C++ kernel multiplies at every batch size, decode (bound by streaming W) and prefill alike;
    elsewhere it is the plain [out, in] tensor given to F.linear."""

    weight: torch.Tensor | None  # [out, in]; None once packed
    bias: torch.Tensor | None = None
    packed: torch.Tensor | None = None  # cpu_linear.pack_linear_weight(weight)
    out_features: int = 0

    def __post_init__(self) -> None:
        if self.weight is not None:
            self.out_features = self.weight.shape[0]

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        """The serving layer for `weight`: packed (and the plain copy dropped) where the kernel
        applies, so the weight is held in memory once."""
        if packs(weight) and (bias is None or bias.dtype == torch.float32):
            packed = cpu_linear.pack_linear_weight(weight)
            return cls(None, bias, packed, weight.shape[0])
        return cls(weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            assert self.weight is not None
            return F.linear(x, self.weight, self.bias)
        if x.dim() == 2:  # the models' flattened tokens: no reshape on the hot path
            return cpu_linear.packed_linear(x, self.packed, self.out_features, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = cpu_linear.packed_linear(rows, self.packed, self.out_features, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def packs(weight: torch.Tensor) -> bool:
    """Whether a weight goes to the packed CPU kernel (float32 on CPU, kernels built)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.numel() >= _MIN_PACKED_WEIGHTS
        and not weight.requires_grad
        and build.available()
    )


def load_column(weights: Weights, prefixes: list[str], bias: bool) -> Linear:
    """Output-dim sharded linear; several prefixes are fused into one matmul (q/k/v, gate/up)."""
    weight = weights.get_multi_sharded([f"{p}.weight" for p in prefixes], dim=0)
    b = weights.get_multi_sharded([f"{p}.bias" for p in prefixes], dim=0) if bias else None
    return Linear.of(weight, b)


@dataclass
class RowLinear:
    """Input-dim sharded linear: each rank computes a partial sum, then all ranks add them."""

    linear: Linear
    world_size: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        if self.world_size > 1:
            dist.all_reduce(out)
        return out


def load_row(weights: Weights, prefix: str, bias: bool) -> RowLinear:
    weight = weights.get_sharded(f"{prefix}.weight", dim=1)
    # The bias must be added once, not once per rank.
    b = weights.get_tensor(f"{prefix}.bias") if bias and weights.rank == 0 else None
    return RowLinear(Linear.of(weight, b), weights.world_size)
