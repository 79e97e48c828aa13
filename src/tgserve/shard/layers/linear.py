"""Dense linear layers split across tensor-parallel ranks (column: outputs, row: inputs + all-reduce)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tgserve.shard.layers.attention import cpu_kernels
from tgserve.shard.loading.weights import Weights

# Up to 8 rows a product is bound by reading the weight, which torch's GEMV streams at about a
# third of memory bandwidth; the C++ kernel reads each weight row once for all rows. Up to 64 rows
# (decode batches) MKL's sgemm repacks the weight on every call; the kernel's register tiles beat
# it by 1.3-2x on this model's layers and LM head (scripts: see the kernel's header comment).
_MAX_KERNEL_ROWS = 64


@dataclass
class Linear:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through the C++ small-batch kernel for decode-sized float32 inputs on CPU."""
    if _fits_kernel(x, weight, bias):
        # x: [..., K] with at most _MAX_KERNEL_ROWS rows in all -> [rows, K] -> [..., N]
        out = cpu_kernels.small_batch_linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _fits_kernel(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() <= _MAX_KERNEL_ROWS * x.shape[-1]
        and x.numel() > 0
        and weight.is_contiguous()
        and (bias is None or bias.dtype == torch.float32)
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and cpu_kernels.available()
    )


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
