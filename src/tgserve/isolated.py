"""Runs a one-off step (model resolution, a GGUF's sidecar or dequantization) in a child process.

Those steps import parts of transformers and torch that the long-lived process never needs again:
tens to hundreds of MB of resident memory that Python never hands back. In a child the memory
goes when it exits.

A fresh interpreter (`python -m tgserve.isolated`), not multiprocessing's spawn: spawn re-imports
the caller's main script, which breaks any script without an `if __name__ == "__main__"` guard,
and fork would copy the parent's threads and memory.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class ChildStepError(RuntimeError):
    pass


def in_child_process(func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`func(*args, **kwargs)` in a fresh interpreter; its result or its exception comes back.

    `func` must be importable by name (a module-level function); the child gets the caller's
    sys.path to find it. Its stderr is the caller's, so its logs and progress bars show.
    """
    with tempfile.TemporaryDirectory(prefix="tgserve-child-") as scratch:
        result_path = os.path.join(scratch, "result.pickle")
        call = pickle.dumps(list(sys.path)) + pickle.dumps((func, args, kwargs))
        run = subprocess.run(
            [sys.executable, "-m", "tgserve.isolated", result_path],
            input=call, stdout=subprocess.DEVNULL, check=False,
        )
        if not os.path.exists(result_path):
            raise ChildStepError(
                f"{getattr(func, '__qualname__', func)} exited with status {run.returncode} "
                "before returning (killed, out of memory or crashed?)"
            )
        with open(result_path, "rb") as f:
            ok, value = pickle.load(f)
    if not ok:
        raise value
    return value


def _serve_one_call(result_path: str) -> None:
    stream = sys.stdin.buffer
    # The callee's module may only be importable through the caller's path, and unpickling the
    # call imports it: the path comes first, in a pickle of its own.
    sys.path[:0] = [p for p in pickle.load(stream) if p not in sys.path]
    outcome: tuple[bool, Any]
    try:
        func, args, kwargs = pickle.load(stream)
        outcome = (True, func(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
        outcome = (False, exc)
    try:
        data = pickle.dumps(outcome)
    except Exception:  # an exception (or result) that does not pickle still says what it was
        data = pickle.dumps((False, ChildStepError(repr(outcome[1]))))
    with open(result_path, "wb") as f:
        f.write(data)


if __name__ == "__main__":
    _serve_one_call(sys.argv[1])
