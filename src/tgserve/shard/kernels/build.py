"""Builds once (JIT, cached on disk) and loads the C++ CPU kernels for this CPU's ISA."""

from __future__ import annotations

import fcntl
import functools
import hashlib
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

# One extension for all kernels: one build, one load (at model load: select_ops) covers them all.
_NAME = "tgserve_cpu_kernels"
_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in (
        "paged_attention.cpp", "packed_linear.cpp", "fused_ops.cpp", "decode_layer.cpp",
        "greedy.cpp", "prefill_attention.cpp", "amx_linear.cpp",
    )
]
# CPUs on which torch itself runs AVX2+FMA kernels; anything else gets portable -O3 code.
_AVX2_CAPABILITIES = frozenset({"AVX2", "AVX512", "AVX512_AMX"})
_AVX512_CAPABILITIES = frozenset({"AVX512", "AVX512_AMX"})


def available() -> bool:
    """True when the kernels are built and loaded; the first call may build them (slow)."""
    return _load() is not None


def compile_flags(capability: str) -> list[str]:
    """-march=native would tie the cached binary to the build host: AVX2+FMA where supported."""
    flags = ["-O3", "-fopenmp"]
    if capability in _AVX2_CAPABILITIES:  # F16C: every AVX2 CPU has it (float16 KV cache rows)
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if capability in _AVX512_CAPABILITIES:  # 32 registers of 16 floats: the packed linear's tiles
        flags += ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"]
    if capability == "AVX512_AMX":  # tile registers: amx_linear.cpp, the larger batches' linears
        flags += ["-mamx-tile", "-mamx-bf16"]
    return flags


def cpu_capability() -> str:
    """torch's ISA level for this CPU, with AMX (Intel Xeon 4th generation on) told apart."""
    capability = torch.backends.cpu.get_cpu_capability()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private: absent in some torch
    if capability == "AVX512" and amx is not None and amx():
        return "AVX512_AMX"
    return capability


def build_directory(capability: str) -> Path:
    # Keyed by torch version (ABI) and ISA, so a cache dir shared between hosts never mixes them.
    return cache_dir() / "torch_extensions" / f"torch{torch.__version__}-{capability.lower()}"


def _load() -> Any | None:
    return _loaded()[0]


@functools.cache
def _loaded() -> tuple[Any | None, str | None]:
    """(the ops, the ISA level they were built for), or (None, None) without kernels."""
    from torch.utils import cpp_extension  # imports setuptools: only pay for it when asked

    _expose_venv_ninja()
    missing = _missing_tool(cpp_extension.get_cxx_compiler())
    if missing is not None:
        logger.warning(
            "%s not found: C++ CPU kernels off, using the torch path", missing
        )
        return None, None
    ops, capability = build_with_fallback(cpp_extension, cpu_capability())
    if ops is None:
        logger.warning("C++ CPU kernels off, using the torch path")
        return None, None
    return ops, capability


def build_with_fallback(cpp_extension: ModuleType, capability: str) -> tuple[Any | None, str]:
    """(the loaded ops or None, the ISA level built): a compiler without AMX (GCC before 11)
    still builds the AVX-512 kernels on an AMX CPU."""
    ops = _build_or_none(cpp_extension, capability)
    if ops is None and capability == "AVX512_AMX":
        capability = "AVX512"
        ops = _build_or_none(cpp_extension, capability)
    return ops, capability


def built_capability() -> str | None:
    """The ISA level the loaded kernels were built for (cpu_capability(), or AVX512 after a failed
    AMX build), None without kernels."""
    return _loaded()[1]


def _build_or_none(cpp_extension: ModuleType, capability: str) -> Any | None:
    try:
        _build(cpp_extension, build_directory(capability), compile_flags(capability))
    except (RuntimeError, OSError) as err:  # a compile error: the message carries the build log
        logger.warning("C++ CPU kernels failed to build for %s: %s", capability, err)
        return None
    return torch.ops.tgserve_cpu


def library() -> Any:
    """torch.ops.tgserve_cpu, built and loaded; the family modules (attention.py, linear.py, ...)
    call their ops through it."""
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
            # torch rebuilds when a source or a flag changes, not a header: the hash is a flag.
            extra_cflags=[*cflags, f"-DTGSERVE_KERNELS_HASH={_sources_hash()}"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
            is_python_module=False,  # registers torch.ops.tgserve_cpu.*; no pybind module needed
        )


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "csrc").iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


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
    """A venv's bin is on PATH only while the venv is active, which a spawned shard may not be."""
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
