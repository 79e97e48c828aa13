"""Builds once (JIT, cached on disk) and loads the C++ CPU kernels; callers fall back without them."""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tgserve.env import cache_dir

logger = logging.getLogger(__name__)

# One extension for all kernels: one build, one load, one warm-up call (server.py) covers them all.
_NAME = "tgserve_cpu_kernels"
_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in ("paged_attention.cpp", "small_batch_linear.cpp")
]
# CPUs on which torch itself runs AVX2+FMA kernels; anything else gets portable -O3 code.
_AVX2_CAPABILITIES = frozenset({"AVX2", "AVX512"})


def available() -> bool:
    """True when the kernels are built and loaded; the first call may build them (tens of seconds)."""
    return _load() is not None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """softmax(q·kᵀ·scale)·v over each row's cached context, read in place through the slot index.

    q: [B, H, D] float32; k_cache/v_cache: [N, Hkv, D]; kv_index: [B, L] int64 slots, of which row b
    uses the first lengths[b]; window > 0 keeps only each row's last `window` positions.
    Returns [B, H, D]; a row with length 0 gives zeros.
    """
    return _ops().paged_decode_attention(q, k_cache, v_cache, kv_index, lengths, scale, window)


def small_batch_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x·weightᵀ (+ bias), streaming each weight row once for all rows of x.

    x: [M, K] float32 with M ≤ 64 (any strides); weight: [N, K] float32, contiguous; bias: [N].
    Returns [M, N]. Meant for decode, where the product is bound by reading the weight.
    """
    return _ops().small_batch_linear(x, weight, bias)


def compile_flags(capability: str) -> list[str]:
    """-march=native would tie the cached binary to the build host; AVX2+FMA only where supported."""
    flags = ["-O3", "-fopenmp"]
    if capability in _AVX2_CAPABILITIES:
        flags += ["-mavx2", "-mfma"]
    return flags


def build_directory(capability: str) -> Path:
    # Keyed by torch version (ABI) and ISA, so a cache dir shared between hosts never mixes them.
    return cache_dir() / "torch_extensions" / f"torch{torch.__version__}-{capability.lower()}"


@functools.cache
def _load() -> Any | None:
    from torch.utils import cpp_extension  # imports setuptools: only pay for it when asked

    _expose_venv_ninja()
    missing = _missing_tool(cpp_extension.get_cxx_compiler())
    if missing is not None:
        logger.warning(
            "%s not found: C++ CPU kernels off, using the torch path", missing
        )
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        _build(cpp_extension, build_directory(capability), compile_flags(capability))
    except (RuntimeError, OSError) as err:  # a compile error: the message carries the build log
        logger.warning("C++ CPU kernels failed to build, using the torch path: %s", err)
        return None
    return torch.ops.tgserve_cpu


def _ops() -> Any:
    ops = _load()
    if ops is None:
        raise RuntimeError("C++ CPU kernels are unavailable; check available() first")
    return ops


def _build(cpp_extension: ModuleType, directory: Path, cflags: list[str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with _exclusive(directory / "build.flock"):
        # torch's own lock is a plain file that a killed build leaves behind, making every later
        # process wait forever; under our flock nobody else is building, so a leftover is stale.
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(
            name=_NAME,
            sources=[str(source) for source in _SOURCES],
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,  # registers torch.ops.tgserve_cpu.*; no pybind module needed
        )


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An flock, unlike a lock file, is released by the kernel if its holder dies mid-build."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _missing_tool(compiler: str) -> str | None:
    """What the build needs but cannot find on PATH, from where cpp_extension runs both."""
    if shutil.which(compiler) is None:
        return f"C++ compiler {compiler!r}"
    if shutil.which("ninja") is None:
        return "ninja"
    return None


def _expose_venv_ninja() -> None:
    """A venv's bin is on PATH only while the venv is activated, which a spawned shard may not be."""
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
