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
