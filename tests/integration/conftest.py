"""Live-server fixtures: a tiny random model for fault and tensor-parallel tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.golden.tiny_models import build
from tests.integration.server import LaunchedServer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    build("llama", folder)
    return folder


def tiny_server(folder: Path, *extra: str) -> LaunchedServer:
    return LaunchedServer(["--model-id", str(folder), "--max-batch-prefill-tokens", "256",
                           "--max-total-tokens", "512", "--kv-cache-memory", "64MiB", *extra])
