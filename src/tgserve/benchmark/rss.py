"""Peak resident memory of a server's process tree, sampled from /proc while a run goes on; and
the CPU time the tree burns (to tell whether an idle server keeps a core busy)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

PROC = Path("/proc")


@dataclass(frozen=True)
class TreeMemory:
    """One sample of a process tree: the sum of current RSS and the sum of per-process peaks."""

    rss_bytes: int
    hwm_bytes: int
    num_processes: int


def _parent_pid(stat_text: str) -> int:
    # The command name (field 2) may hold spaces and parentheses; fields after it are plain.
    return int(stat_text[stat_text.rindex(")") + 2 :].split()[1])


def process_tree(pid: int, proc: Path = PROC) -> list[int]:
    """`pid` and all its living descendants (found through each process's parent in stat)."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = _parent_pid((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(ppid, []).append(int(entry.name))
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        frontier.extend(children.get(current, []))
    return tree


def read_status_kib(pid: int, proc: Path = PROC) -> dict[str, int]:
    """VmRSS and VmHWM of one process in KiB; empty when it is gone or has no memory (a zombie)."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def sample_tree(pid: int, proc: Path = PROC) -> TreeMemory:
    """The memory of `pid`'s tree right now."""
    statuses = [read_status_kib(p, proc) for p in process_tree(pid, proc)]
    statuses = [s for s in statuses if s]
    return TreeMemory(
        rss_bytes=sum(s.get("VmRSS", 0) for s in statuses) * 1024,
        hwm_bytes=sum(s.get("VmHWM", 0) for s in statuses) * 1024,
        num_processes=len(statuses),
    )


def cpu_seconds(pid: int, proc: Path = PROC) -> float:
    """User plus system CPU time of one process so far; 0.0 when it is gone."""
    try:
        text = (proc / str(pid) / "stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3 (the state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int, proc: Path = PROC) -> float:
    """CPU time of `pid` and its living descendants (threads included, ended children not)."""
    return sum(cpu_seconds(p, proc) for p in process_tree(pid, proc))


def idle_cpu_percent(pid: int, seconds: float, proc: Path = PROC) -> float:
    """Share of one core `pid`'s tree used over `seconds` of wall time (100.0: one full core)."""
    start_cpu, start = tree_cpu_seconds(pid, proc), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - start
    return 100.0 * (tree_cpu_seconds(pid, proc) - start_cpu) / elapsed if elapsed > 0 else 0.0


@dataclass
class RssSampler:
    """Samples a tree in a background thread; `peak_bytes` is the largest summed RSS seen."""

    pid: int
    interval_s: float = 0.1
    peak_bytes: int = 0
    # Per-process high-water marks summed: an upper bound that also catches spikes between samples.
    peak_hwm_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def sample(self) -> None:
        memory = sample_tree(self.pid)
        self.peak_bytes = max(self.peak_bytes, memory.rss_bytes)
        self.peak_hwm_bytes = max(self.peak_hwm_bytes, memory.hwm_bytes)

    def start(self) -> Self:
        if not pid_exists(self.pid):
            raise ValueError(f"no process with pid {self.pid}")
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.sample()
        return self.peak_bytes

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pid_exists(pid: int) -> bool:
    return os.path.isdir(PROC / str(pid))
