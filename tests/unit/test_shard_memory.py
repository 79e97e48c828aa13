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


@pytest.mark.skipif(_libc() is None, reason="glibc's malloc_trim")
def test_decode_hands_freed_heap_back() -> None:
    # Decode steps recycle their buffers in the heap too (recycle_step_buffers); between steps
    # the heap must hold only what is live, or a batch-64 step's logits stay resident.
    libc = _libc()
    assert libc is not None
    generator = HeapLeavingGenerator(libc)
    generator.decode = lambda batch_ids: generator.prefill(0, [], None)  # type: ignore[attr-defined]
    service = TextGenerationService(generator, SimpleNamespace(world_size=1, rank=0))  # type: ignore[arg-type]
    request = pb.DecodeRequest(batches=[pb.CachedBatch(id=1, request_ids=[1], size=1)])
    libc.malloc_trim(0)
    before = rss_mib()
    asyncio.run(service.Decode(request, None))
    grown = rss_mib() - before
    assert grown < 16, f"RSS grew by {grown:.1f} MiB across a decode step"
    for c in generator.kept:
        libc.free(c)


MIB = 1 << 20


def _faults_of_a_second_step() -> int:
    """Minor page faults of a step that allocates, touches and frees 8 buffers of 8 MiB, as a
    prefill's layers do, after an identical step: what recycling the first one's pages saves."""
    import resource

    import torch

    def step() -> None:
        for _ in range(8):
            torch.ones(2 * MIB)  # 8 MiB of float32, written whole, freed at once

    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _in_fresh_process(code: str) -> str:
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()


@pytest.mark.skipif(_libc() is None or not hasattr(_libc(), "mallopt"), reason="glibc's mallopt")
def test_step_buffers_are_recycled_not_faulted_in_again() -> None:
    # Fresh processes: mallopt's setting lasts for the process. The control is the setting
    # before (every buffer of 4 MiB and up in a mapping of its own): each of the second step's
    # 16k pages faulted in again.
    code = (
        "from tests.unit.test_shard_memory import _faults_of_a_second_step as f\n"
        "from tgserve.memory import recycle_step_buffers\n"
        "{setup}\n"
        "print(f())\n"
    )
    control = "assert recycle_step_buffers(mmap_threshold=4 << 20)"
    faulted_when_mapped = int(_in_fresh_process(code.format(setup=control)))
    recycled = code.format(setup="assert recycle_step_buffers()")
    faulted_when_recycled = int(_in_fresh_process(recycled))
    assert faulted_when_mapped >= 8 * 2048, "control: mapped buffers fault in every page"
    assert faulted_when_recycled < 1000
