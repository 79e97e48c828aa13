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


@pytest.mark.skipif(_libc() is None or not hasattr(ctypes, "memset"), reason="glibc's malloc_trim")
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
