"""The C++ packed linear: weights as panels of output columns, multiplied at every batch size."""

from __future__ import annotations

import torch

from tgserve.shard.kernels.build import library


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] float32 -> [ceil(N / P), K, P] panels of P output columns (linear_panel_width())."""
    return library().pack_linear_weight(weight)


def linear_panel_width() -> int:
    """Output columns per panel, fixed by the vector width the kernels were compiled for."""
    return int(library().linear_panel_width())


def linear_amx_min_rows() -> int:
    """Rows from which packed_linear multiplies on AMX tiles (amx_linear.cpp); 0 without AMX."""
    return int(library().linear_amx_min_rows())


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, n: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [M, K] · Wᵀ (+ bias) -> [M, n], W given as pack_linear_weight(W) with n rows."""
    return library().packed_linear(x, packed, n, bias)


def packed_rows(ids: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """W[ids] read back from pack_linear_weight(W): an embedding lookup on a tied LM head."""
    return library().packed_rows(ids, packed, n)
