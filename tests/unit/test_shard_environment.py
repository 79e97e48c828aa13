"""What the launcher puts in a shard's environment: 2 MiB pages for torch's large tensors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tgserve import env
from tgserve.launcher import supervisor
from tgserve.launcher.args import parse
from tgserve.launcher.source import ModelSource


def test_shards_ask_torch_for_huge_pages_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    assert env.shard_environment({"RANK": "0"})["THP_MEM_ALLOC_ENABLE"] == "1"
    assert "THP_MEM_ALLOC_ENABLE" not in env.child_environment({})  # the router: no tensors
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's word wins
    assert env.shard_environment({})["THP_MEM_ALLOC_ENABLE"] == "0"
    assert env.shard_environment({"THP_MEM_ALLOC_ENABLE": "x"})["THP_MEM_ALLOC_ENABLE"] == "x"


class _Spawned(Exception):
    pass


def test_the_launcher_spawns_shards_with_that_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    seen: list[dict[str, str]] = []

    def spawn(name: str, argv: list[str], child_env: dict[str, str]) -> None:
        seen.append(child_env)
        raise _Spawned

    monkeypatch.setattr(supervisor.Child, "spawn", staticmethod(spawn))
    launcher = supervisor.Supervisor(parse(["--shard-uds-path", str(tmp_path / "uds")]))
    source = ModelSource(model_id="m", path=tmp_path, gguf_file=None, revision=None)
    with pytest.raises(_Spawned):
        launcher._start_shards(supervisor.resolved(launcher.config, source, 1))
    assert seen[0]["THP_MEM_ALLOC_ENABLE"] == "1" and seen[0]["RANK"] == "0"


def test_torch_reads_the_variable_at_its_first_large_allocation() -> None:
    """Set before the first tensor of 2 MiB or more, it takes effect: what the launcher relies on.
    Read off the smaps of a child process, where the kernel offers transparent huge pages."""
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if not mode.exists() or "[never]" in mode.read_text():
        pytest.skip("this kernel offers no transparent huge pages (or is not Linux)")
    code = (
        "import torch; t = torch.ones(16 << 20);"  # 64 MiB
        "print(sum(int(l.split()[1]) for l in open('/proc/self/smaps')"
        " if l.startswith('AnonHugePages')))"
    )

    def huge_kib(value: str) -> int:
        child_env = {**env.child_environment({}), "THP_MEM_ALLOC_ENABLE": value}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=child_env
        )
        return int(out.stdout.strip())
    assert huge_kib("1") >= 32 << 10
    assert huge_kib("0") < huge_kib("1")
