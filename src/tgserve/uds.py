"""The shards' unix sockets: a path that answers belongs to a live server and is never removed."""

from __future__ import annotations

import contextlib
import os
import socket


class SocketInUse(RuntimeError):
    """Something answers at the path: the socket of another server's shard, most likely."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"another process serves on {path}: a shard of another running server? "
            "Stop it, or give this server another --shard-uds-path"
        )
        self.path = path


def answers(path: str) -> bool:
    """Whether a connect() to the unix socket at `path` succeeds; a refused one is a stale file."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return False
        except OSError:
            # Permission denied, a full backlog, a timeout: someone may well be serving there,
            # and removing the path would cut that server off from its shard.
            return True
    return True


def remove_stale(path: str) -> None:
    """Remove what a stopped server left at `path`; SocketInUse if a live one still serves there."""
    if not os.path.lexists(path):
        return
    if answers(path):
        raise SocketInUse(path)
    with contextlib.suppress(FileNotFoundError):  # a concurrent cleanup got there first
        os.remove(path)


Identity = tuple[int, int, int]


def identity(path: str) -> Identity | None:
    """Which file is at `path` now; None when none is. A socket removed and bound again by another
    process keeps its path, not its identity: the inode number alone may be reused at once, so
    the change time comes with it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def remove_own(path: str, bound: Identity | None) -> None:
    """Remove the socket this process bound, and never one that replaced it since."""
    if bound is not None and identity(path) == bound:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
