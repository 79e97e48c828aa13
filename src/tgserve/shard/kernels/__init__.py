"""Kernels: the ops table the layers call, its C++ (csrc/, built by build.py) and torch twins."""

from tgserve.shard.kernels.ops import CPU_OPS, TORCH_OPS, KernelOps, select_ops

__all__ = ["CPU_OPS", "TORCH_OPS", "KernelOps", "select_ops"]
