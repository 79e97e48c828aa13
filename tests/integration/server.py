"""Runs the real launcher as a subprocess on free loopback ports, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tgserve.config import default_shard_uds_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LaunchedServer:
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    log_path: Path = field(default_factory=lambda: Path(tempfile.mkstemp(suffix=".log")[1]))
    uds: str = field(default_factory=lambda: tempfile.mktemp(prefix="tgs-", dir="/tmp"))
    # False: no --shard-uds-path nor --master-port, as a user would start it; the launcher picks
    # this server's own (see `socket_prefix`).
    own_socket_flags: bool = True
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket_prefix(self) -> str:
        return self.uds if self.own_socket_flags else default_shard_uds_path(self.port)

    def start(self, timeout: float = 600) -> LaunchedServer:
        argv = [sys.executable, "-m", "tgserve.cli", *self.args, "--hostname", "127.0.0.1",
                "--port", str(self.port), "--prometheus-port", str(free_port())]
        if self.own_socket_flags:
            argv += ["--shard-uds-path", self.uds, "--master-port", str(free_port())]
        env = {**os.environ, "TQDM_DISABLE": "1", **self.env}
        if not self.own_socket_flags:
            for variable in ("SHARD_UDS_PATH", "MASTER_PORT"):  # they would set the flags
                env.pop(variable, None)
        self.process = subprocess.Popen(argv, stdout=self.log_path.open("w"),
                                        stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"launcher exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout}s:\n{self.log()}")

    def log(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def children(self) -> list[int]:
        """PIDs of every process below the launcher."""
        assert self.process is not None
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def assert_no_orphans(children: list[int], within: float = 5.0) -> None:
    """Every one of `children` (PIDs) exits within `within` seconds of its launcher."""
    deadline = time.monotonic() + within
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(c) for c in children), "orphaned child processes"
