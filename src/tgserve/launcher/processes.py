"""The launcher's child processes: spawned with a death signal, output relayed and remembered."""

from __future__ import annotations

import collections
import ctypes
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If the launcher is killed outright, the kernel kills its children: no orphans, ever.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=40))

    @classmethod
    def spawn(cls, name: str, argv: list[str], env: dict[str, str]) -> Child:
        # A process group of its own: a Ctrl-C (or a `timeout`) that signals the launcher's whole
        # group would otherwise stop the shards at once, under the requests the router drains.
        # The launcher stops its children itself, router first.
        process = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            process_group=0, text=True, errors="replace", bufsize=1,
        )
        child = cls(name, process)
        threading.Thread(target=child._relay, name=f"relay-{name}", daemon=True).start()
        return child

    def _relay(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.tail.append(line.rstrip("\n"))
            sys.stderr.write(line)
        sys.stderr.flush()

    @property
    def exit_code(self) -> int | None:
        return self.process.poll()

    def last_lines(self, n: int = 20) -> str:
        return "\n".join(list(self.tail)[-n:])

    def terminate(self, timeout: float) -> None:
        """SIGTERM, then SIGKILL once `timeout` seconds have passed."""
        if self.exit_code is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.exit_code is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.exit_code is None:
            self.process.kill()
            self.process.wait()


def python_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tgserve.cli", *args]


def free_tcp_port() -> int:
    """A TCP port no one listens on now, on any address (the kernel's pick)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def tcp_port_in_use(port: int) -> bool:
    """Whether binding the port fails. SO_REUSEADDR as torch.distributed's store sets it: a port
    left in TIME_WAIT by a stopped server is free to it, one that something listens on is not."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False
