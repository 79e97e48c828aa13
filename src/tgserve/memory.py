"""Gives memory a process no longer uses back to the OS: resident memory matches what it holds."""

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


# mallopt's parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit: buffers up to here come from the heap.
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the heap's top that free() leaves alone; trim_heap() hands it back between steps.
TRIM_THRESHOLD_BYTES = 1 << 30


def recycle_step_buffers(
    mmap_threshold: int = MMAP_THRESHOLD_BYTES, trim_threshold: int = TRIM_THRESHOLD_BYTES
) -> bool:
    """Serve a step's multi-MB buffers (activations, logits) from the heap and keep them there
    while the step runs, so that each layer reuses the pages the one before freed.

    Each buffer in a mapping of its own (glibc's fixed 4 MiB threshold before this) was faulted
    in page by page and unmapped again at every op, a large share of a prefill's time
    (docs/design/step-buffers-in-heap.md). The
    heap's growth is handed back after the step instead (trim_heap after every Prefill and
    Decode), which reaches freed chunks anywhere in the heap, not only at its top. True when set
    (glibc)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return bool(ok and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1)
