"""Dense linears split across tensor-parallel ranks (column: outputs, row: inputs + all-reduce)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tgserve.shard.kernels import KernelOps
from tgserve.shard.loading.weights import Weights


@dataclass
class Linear:
    """y = x·Wᵀ (+ bias). Where the kernels pack the weight (the C++ ops: float32 on CPU) it lives
    only as `packed`, which they multiply at every batch size; elsewhere it is the plain
    [out, in] tensor given to F.linear."""

    weight: torch.Tensor | None  # [out, in]; None once packed
    bias: torch.Tensor | None = None
    packed: torch.Tensor | None = None  # kernels.pack_linear(weight, bias)
    out_features: int = 0
    kernels: KernelOps = field(kw_only=True)

    def __post_init__(self) -> None:
        if self.weight is not None:
            self.out_features = self.weight.shape[0]

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None, kernels: KernelOps) -> Linear:
        """The serving layer for `weight`: packed (and the plain copy dropped) where the kernels
        pack it, so the weight is held in memory once."""
        packed = kernels.pack_linear(weight, bias)
        if packed is not None:
            return cls(None, bias, packed, weight.shape[0], kernels=kernels)
        return cls(weight, bias, kernels=kernels)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            assert self.weight is not None
            return F.linear(x, self.weight, self.bias)
        if x.dim() == 2:  # the models' flattened tokens: no reshape on the hot path
            return self.kernels.packed_linear(x, self.packed, self.out_features, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        out = self.kernels.packed_linear(rows, self.packed, self.out_features, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def load_column(weights: Weights, prefixes: list[str], bias: bool, kernels: KernelOps) -> Linear:
    """Output-dim sharded linear; several prefixes are fused into one matmul (q/k/v, gate/up)."""
    weight = weights.get_multi_sharded([f"{p}.weight" for p in prefixes], dim=0)
    b = weights.get_multi_sharded([f"{p}.bias" for p in prefixes], dim=0) if bias else None
    return Linear.of(weight, b, kernels)


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


def load_row(weights: Weights, prefix: str, bias: bool, kernels: KernelOps) -> RowLinear:
    weight = weights.get_sharded(f"{prefix}.weight", dim=1)
    # The bias must be added once, not once per rank.
    b = weights.get_tensor(f"{prefix}.bias") if bias and weights.rank == 0 else None
    return RowLinear(Linear.of(weight, b, kernels), weights.world_size)
