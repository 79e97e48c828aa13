"""When the fused C++ CPU operations may replace their torch compositions (float32 on CPU)."""

from __future__ import annotations

import torch

from tgserve.shard.kernels import build


def cpu_kernels_fit(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a float32 CPU tensor outside autograd and the kernels are built.

    Anything else (CUDA, half precision, a backward pass) takes the torch path, which is also the
    reference the kernels are tested against.
    """
    for t in tensors:
        if t.device.type != "cpu" or t.dtype != torch.float32 or t.requires_grad:
            return False
    return build.available()


# What the kernels read and write a KV cache in: float32, or float16 widened as it is loaded.
KERNEL_KV_DTYPES = (torch.float32, torch.float16)


def cpu_kernels_fit_cache(cache: torch.Tensor) -> bool:
    """True when the kernels may read and write this layer's K or V cache."""
    return cache.device.type == "cpu" and cache.dtype in KERNEL_KV_DTYPES
