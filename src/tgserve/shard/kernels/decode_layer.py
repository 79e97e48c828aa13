"""The C++ decode layer: a whole Llama-shaped layer of a decode step in one op."""

from __future__ import annotations

from typing import Any

import torch

from tgserve.shard.kernels.build import library


def llama_decode_layer(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole Llama-shaped layer of a decode step in one op; see models/llama.py for arguments."""
    out, residual = library().llama_decode_layer(*args)
    return out, residual
