"""Resident memory: what a prefill leaves in glibc's heap goes back to the OS after the step."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import re
from types import SimpleNamespace

import pytest

from tgserve.pb import generate_pb2 as pb
from tgserve.shard.generation import StepTimings
from tgserve.shard.service import TextGenerationService

CHUNK = 64 << 10  # below glibc's mmap threshold: served from the heap, kept there when freed
CHUNKS = 1024  # 64 MiB


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024  # type: ignore[union-attr]


class HeapLeavingGenerator:
    """A prefill whose activations are freed into the heap below one block still in use, as a
    real step's are: free() alone cannot give them back (only the heap's top is trimmed)."""

    def __init__(self, libc: ctypes.CDLL) -> None:
        self.libc = libc
        self.libc.malloc.restype = ctypes.c_void_p
        self.libc.free.argtypes = [ctypes.c_void_p]
        self.kept: list[int] = []

    def prefill(self, batch_id: int, new: list, running_id: int | None) -> tuple:
        chunks = [self.libc.malloc(CHUNK) for _ in range(CHUNKS)]
        for c in chunks:
            ctypes.memset(c, 1, CHUNK)  # touched: resident
        self.kept.append(self.libc.malloc(CHUNK))  # above them, live
        for c in chunks:
            self.libc.free(c)
        return [], None, StepTimings(0, 0, 0)


@pytest.mark.skipif(_libc() is None, reason="glibc's malloc_trim")
def test_prefill_hands_freed_heap_back() -> None:
    libc = _libc()
    assert libc is not None
    generator = HeapLeavingGenerator(libc)
    settings = SimpleNamespace(world_size=1, rank=0)
    service = TextGenerationService(generator, settings)  # type: ignore[arg-type]
    request = pb.PrefillRequest(batch=pb.Batch(id=1))

    def prefill_grows_rss_by() -> float:
        before = rss_mib()
        asyncio.run(service.Prefill(request, None))
        return rss_mib() - before

    libc.malloc_trim(0)  # no free heap to reuse: the step's chunks are new pages
    grown = prefill_grows_rss_by()
    # 64 MiB were touched and freed in the step; without the trim they stay resident.
    assert grown < 16, f"RSS grew by {grown:.1f} MiB across a prefill"
    for c in generator.kept:
        libc.free(c)


MIB = 1 << 20


def _retained_after_freeing_8_mib_buffers(libc: ctypes.CDLL) -> float:
    """RSS growth after 8 buffers of 8 MiB are touched and freed below a live block: what the
    heap keeps when such buffers come from it rather than from mappings of their own."""
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    big = libc.malloc(16 * MIB)  # freed mapped buffers raise glibc's threshold to their size
    libc.free(big)
    libc.malloc_trim(0)
    before = rss_mib()
    buffers = [libc.malloc(8 * MIB) for _ in range(8)]
    for b in buffers:
        ctypes.memset(b, 1, 8 * MIB)
    live = libc.malloc(8 * MIB)  # as large: from the heap's top, so above the others
    for b in buffers:
        libc.free(b)
    grown = rss_mib() - before
    libc.free(live)
    return grown


def _in_fresh_process(code: str) -> str:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


@pytest.mark.skipif(_libc() is None or not hasattr(_libc(), "mallopt"), reason="glibc's mallopt")
def test_large_buffers_go_back_to_the_os_when_freed() -> None:
    # Fresh processes: mallopt's setting lasts for the process; the control shows the heap
    # keeping the buffers when the threshold is left to rise.
    code = (
        "import ctypes, ctypes.util\n"
        "from tests.unit.test_shard_memory import _retained_after_freeing_8_mib_buffers as f\n"
        "from tgserve.memory import serve_large_buffers_from_mmap\n"
        "libc = ctypes.CDLL(ctypes.util.find_library('c'))\n"
        "{setup}\n"
        "print(round(f(libc)))\n"
    )
    kept_by_default = int(_in_fresh_process(code.format(setup="")))
    kept_when_set = int(_in_fresh_process(code.format(setup="assert serve_large_buffers_from_mmap()")))
    assert kept_by_default >= 48, "control: the heap should have kept the freed buffers"
    assert kept_when_set < 8
