"""Live-server fixtures: the packaged default model, and a tiny random model for fault tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.golden.tiny_models import build
from tests.integration.server import LaunchedServer

# Small limits keep start-up (warmup) short on a 2-core machine.
SMALL_LIMITS = ["--max-batch-prefill-tokens", "1024", "--max-input-tokens", "1000",
                "--max-total-tokens", "2048", "--kv-cache-memory", "512MiB"]


@pytest.fixture(scope="session")
def default_server() -> Iterator[LaunchedServer]:
    server = LaunchedServer(SMALL_LIMITS).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build("llama", folder)
    return folder


def tiny_server(folder: Path, *extra: str) -> LaunchedServer:
    return LaunchedServer(["--model-id", str(folder), "--max-batch-prefill-tokens", "256",
                           "--max-total-tokens", "512", "--kv-cache-memory", "64MiB", *extra])
