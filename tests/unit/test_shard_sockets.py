"""The shards' sockets: a live one is never removed, each server has its own by default, and the
launcher stops when one of its shards' sockets is lost."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tgserve import uds
from tgserve.config import Config, default_shard_uds_path
from tgserve.launcher import supervisor
from tgserve.launcher.args import parse
from tgserve.launcher.processes import tcp_port_in_use
from tgserve.launcher.weights import ModelSource

SOURCE = ModelSource("m", Path("/m"), None, None)


@contextmanager
def listening(path: Path) -> Iterator[socket.socket]:
    """A live server's socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        yield server


def stale(path: Path) -> Path:
    """What a killed server leaves: the socket file, with no one listening."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
    return path


def test_a_live_socket_answers_and_a_stale_one_does_not(tmp_path: Path) -> None:
    with listening(tmp_path / "live"):
        assert uds.answers(str(tmp_path / "live"))
    assert (tmp_path / "live").exists() and not uds.answers(str(tmp_path / "live"))
    assert not uds.answers(str(tmp_path / "missing"))


def test_only_a_stale_socket_is_removed(tmp_path: Path) -> None:
    uds.remove_stale(str(stale(tmp_path / "old")))
    assert not (tmp_path / "old").exists()
    uds.remove_stale(str(tmp_path / "missing"))  # nothing there: nothing to do
    with listening(tmp_path / "live"):
        with pytest.raises(uds.SocketInUse, match="--shard-uds-path"):
            uds.remove_stale(str(tmp_path / "live"))
        assert uds.answers(str(tmp_path / "live"))


@contextmanager
def replaced(path: Path) -> Iterator[socket.socket]:
    """Another server's live socket put in place of the one at `path`."""
    other = path.with_name(path.name + ".other")
    with listening(other) as server:
        os.rename(other, path)
        yield server


def test_a_shard_removes_its_own_socket_and_never_one_that_replaced_it(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with listening(path):
        mine = uds.identity(str(path))
        with replaced(path):
            uds.remove_own(str(path), mine)
            assert uds.answers(str(path))
    uds.remove_own(str(path), uds.identity(str(path)))
    assert not path.exists()


# ---- defaults: one prefix and one torch.distributed port per server ---------------------------


def test_unset_socket_prefixes_differ_by_port() -> None:
    a = supervisor.resolved(parse(["--port", "8081"]), SOURCE, 1)
    b = supervisor.resolved(parse(["--port", "8082"]), SOURCE, 1)
    assert a.shard_uds_path == default_shard_uds_path(8081) == "/tmp/text-generation-server-8081"
    assert b.shard_socket(0) == "/tmp/text-generation-server-8082-0"


def test_given_socket_prefix_and_master_port_keep_their_meaning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # TGI's default, given: used as it is, not made per-port.
    config = supervisor.resolved(parse(["--shard-uds-path", "/tmp/text-generation-server",
                                        "--master-port", "29500"]), SOURCE, 2)
    assert config.shard_socket(1) == "/tmp/text-generation-server-1"
    assert config.master_port == 29500
    monkeypatch.setenv("SHARD_UDS_PATH", "/run/tgs/s")
    monkeypatch.setenv("MASTER_PORT", "29600")
    from_env = supervisor.resolved(parse([]), SOURCE, 2)
    assert (from_env.shard_uds_path, from_env.master_port) == ("/run/tgs/s", 29600)


def test_an_unset_master_port_is_a_free_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_PORT", raising=False)
    config = supervisor.resolved(parse([]), SOURCE, 2)
    assert config.master_port is not None and not tcp_port_in_use(config.master_port)
    _, env = supervisor.shard_command(config, 1)
    assert env["MASTER_PORT"] == str(config.master_port)


# ---- the launcher: refuses a live socket, notices a lost one ----------------------------------


class _Spawned(Exception):
    pass


def launcher_for(tmp_path: Path, *argv: str) -> tuple[supervisor.Supervisor, Config, list[str]]:
    launcher = supervisor.Supervisor(parse(["--shard-uds-path", str(tmp_path / "uds"), *argv]))
    spawned: list[str] = []
    return launcher, supervisor.resolved(launcher.config, SOURCE, 2), spawned


def test_the_launcher_spawns_nothing_while_another_server_answers_on_a_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher, config, spawned = launcher_for(tmp_path)
    monkeypatch.setattr(supervisor.Child, "spawn",
                        staticmethod(lambda name, *a: spawned.append(name)))
    stale(tmp_path / "uds-0")
    with listening(tmp_path / "uds-1"):
        with pytest.raises(supervisor.LauncherError) as refused:
            launcher._start_shards(config)
        assert uds.answers(str(tmp_path / "uds-1"))  # the other server keeps its socket
    message = str(refused.value)
    assert message.startswith(f"--shard-uds-path {tmp_path / 'uds'}: ")
    assert f"another process serves on {tmp_path / 'uds-1'}" in message
    assert spawned == []


def test_stale_sockets_are_removed_before_the_shards_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launcher, config, spawned = launcher_for(tmp_path)

    def spawn(name: str, *args: object) -> None:
        spawned.append(name)
        raise _Spawned

    monkeypatch.setattr(supervisor.Child, "spawn", staticmethod(spawn))
    stale(tmp_path / "uds-0")
    stale(tmp_path / "uds-1")
    with pytest.raises(_Spawned):
        launcher._start_shards(config)
    assert spawned == ["shard-0"]
    assert not (tmp_path / "uds-0").exists() and not (tmp_path / "uds-1").exists()


def test_a_given_master_port_in_use_is_refused_before_the_shards_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        launcher, config, _ = launcher_for(tmp_path, "--master-port", str(port))
        with pytest.raises(supervisor.LauncherError, match=f"--master-port {port} is in use"):
            launcher._start_shards(config)


def watched(tmp_path: Path, path: Path) -> supervisor.Supervisor:
    launcher = supervisor.Supervisor(parse(["--shard-uds-path", str(tmp_path / "uds")]))
    launcher.sockets = [("shard-0", str(path), uds.identity(str(path)))]
    return launcher


def test_the_launcher_stops_when_a_shard_socket_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "uds-0"
    with listening(path):
        launcher = watched(tmp_path, path)
        launcher._check_sockets()  # present and answering: nothing to say
        os.remove(path)
        with pytest.raises(supervisor.LauncherError,
                           match=f"shard-0's socket {path} was removed"):
            launcher._watch()  # its first tick looks at the sockets


def test_the_launcher_stops_when_a_shard_socket_is_replaced_or_silent(tmp_path: Path) -> None:
    path = tmp_path / "uds-0"
    with listening(path):
        launcher = watched(tmp_path, path)
    # The listener closed: the file is the same, no one answers on it.
    with pytest.raises(supervisor.LauncherError, match="shard-0 no longer answers"):
        launcher._check_sockets()
    with replaced(path):
        with pytest.raises(supervisor.LauncherError, match="replaced by another process's"):
            launcher._check_sockets()
