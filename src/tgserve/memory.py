"""Gives memory a process no longer uses back to the OS, so resident memory matches what it holds."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

log = logging.getLogger(__name__)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> None:
    """After loading (a shard's weights, a tokenizer's JSON) and warmup (the largest activations),
    glibc keeps tens to hundreds of MB of freed heap mapped; malloc_trim returns it. A no-op
    elsewhere."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """malloc_trim alone: tens of microseconds when little is free, so it fits between steps."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


# mallopt's parameter number for the mmap threshold (glibc's malloc.h).
_M_MMAP_THRESHOLD = -3
# Every buffer from here up gets a mapping of its own, handed back whole when freed.
MMAP_THRESHOLD_BYTES = 4 << 20


def serve_large_buffers_from_mmap(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold instead of letting it rise (up to 32 MB) each time a mapped
    buffer is freed. Risen, the threshold sends a step's multi-MB buffers (a batch's logits, a
    prefill's activations) to the heap, where freeing them below a live block leaves them
    resident: ~50 MB held in a shard after a c=64 run, out of reach of a trim between steps.
    True when set (glibc)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1)
