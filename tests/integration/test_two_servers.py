"""Two servers on one host: each keeps its own shards while the other restarts; a launcher never
takes over a live server's socket, and stops when its own shard's socket is lost."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.golden.tiny_models import build
from tests.integration.conftest import tiny_server
from tests.integration.server import LaunchedServer, assert_no_orphans
from tgserve import uds

# Four 2-shard starts and a restart: a minute and more, in `make test-slow` with the fuzz and soak.
pytestmark = pytest.mark.longrun

BODY = {"inputs": "w5 w17 w300 w42", "parameters": {"max_new_tokens": 12}}


def generate(server: LaunchedServer) -> str:
    try:
        r = httpx.post(f"{server.url}/generate", json=BODY, timeout=120)
    except httpx.TimeoutException as e:
        raise AssertionError(f"no answer from {server.url}:\n{server.log()}") from e
    assert r.status_code == 200, r.text
    return str(r.json()["generated_text"])


def shard_sockets(server: LaunchedServer, shards: int) -> list[str]:
    return [f"{server.socket_prefix}-{rank}" for rank in range(shards)]


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another random model of the same shape: other weights, other answers."""
    folder = tmp_path_factory.mktemp("tiny-llama-other")
    build("llama", folder, seed=1)
    return folder


@pytest.fixture(scope="module")
def first(tiny_model_dir: Path) -> Iterator[LaunchedServer]:
    """A server started as a user would: no --shard-uds-path, no --master-port; two shards, so
    that torch.distributed's port is in play too."""
    server = tiny_server(tiny_model_dir, "--num-shard", "2")
    server.own_socket_flags = False
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_two_servers_keep_their_own_shards_while_one_restarts(
    first: LaunchedServer, other_model_dir: Path
) -> None:
    mine = generate(first)
    second = tiny_server(other_model_dir, "--num-shard", "2")
    second.own_socket_flags = False
    try:
        second.start()
        theirs = generate(second)
        assert theirs != mine  # two models: an answer tells which shards served it
        sockets = shard_sockets(first, 2)
        assert set(sockets).isdisjoint(shard_sockets(second, 2))
        bound = [uds.identity(s) for s in sockets]

        assert second.stop() == 0
        assert generate(first) == mine
        second.start()
        assert generate(second) == theirs
        assert generate(first) == mine
        assert [uds.identity(s) for s in sockets] == bound  # never removed nor replaced
        assert first.process is not None and first.process.poll() is None
    finally:
        second.stop()


def test_a_launcher_refuses_a_socket_prefix_a_live_server_answers_on(
    first: LaunchedServer, tiny_model_dir: Path
) -> None:
    mine = generate(first)
    intruder = tiny_server(tiny_model_dir, "--shard-uds-path", first.socket_prefix)
    intruder.own_socket_flags = False
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="launcher exited with 1"):
        intruder.start(timeout=120)
    assert time.monotonic() - started < 60  # before any shard was spawned, let alone loaded
    log = intruder.log()
    assert f"--shard-uds-path {first.socket_prefix}: another process serves on " \
           f"{first.socket_prefix}-0" in log
    assert "shard-0" not in log.replace(f"{first.socket_prefix}-0", "")  # nothing spawned
    assert all(uds.answers(s) for s in shard_sockets(first, 2))
    assert generate(first) == mine


def test_a_removed_shard_socket_stops_its_launcher(tiny_model_dir: Path) -> None:
    server = tiny_server(tiny_model_dir).start()
    try:
        children = server.children()
        socket_path = f"{server.socket_prefix}-0"
        os.remove(socket_path)
        removed_at = time.monotonic()
        code = server.process.wait(timeout=15)  # type: ignore[union-attr]
        assert time.monotonic() - removed_at < 5
        assert code == 1
        assert f"shard-0's socket {socket_path} was removed" in server.log()
        assert_no_orphans(children)
    finally:
        server.stop()
