"""Runs a one-off launcher step (a GGUF's sidecar, a pickle conversion) in a child process.

Those steps import transformers and torch: ~300 MB of resident memory that Python never hands
back, and the launcher lives as long as the server. In a child the memory goes when it exits.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def in_child_process(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`func(*args, **kwargs)` in a fresh interpreter; its result or its exception comes back.

    `spawn`, not `fork`: a forked child would start with the launcher's threads and memory, and
    `func` must be importable by name (a module-level function) for the child to find it.
    """
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(func, *args, **kwargs).result()
