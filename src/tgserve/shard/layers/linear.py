"""Dense linear layers split across tensor-parallel ranks (column: outputs, row: inputs + all-reduce)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tgserve.shard.loading.weights import Weights


@dataclass
class Linear:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def load_column(weights: Weights, prefixes: list[str], bias: bool) -> Linear:
    """Output-dim sharded linear; several prefixes are fused into one matmul (q/k/v, gate/up)."""
    weight = weights.get_multi_sharded([f"{p}.weight" for p in prefixes], dim=0)
    b = weights.get_multi_sharded([f"{p}.bias" for p in prefixes], dim=0) if bias else None
    return Linear(weight, b)


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
    return RowLinear(Linear(weight, b), weights.world_size)
