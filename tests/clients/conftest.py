"""A live server on the default model for the official client packages (one per session)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import ModuleType

import pytest

from tests.integration.server import LaunchedServer

# Small limits keep start-up (warmup) short on a 2-core machine.
CLIENT_LIMITS = [
    "--max-batch-prefill-tokens",
    "1024",
    "--max-input-tokens",
    "1000",
    "--max-total-tokens",
    "2048",
    "--kv-cache-memory",
    "512MiB",
]


@pytest.fixture(scope="session")
def server() -> Iterator[LaunchedServer]:
    launched = LaunchedServer(CLIENT_LIMITS).start()
    yield launched
    launched.stop()


def require(module: str) -> ModuleType:
    """Import a client package; missing, the test skips (and fails under CI=true)."""
    if os.environ.get("CI", "").lower() == "true":
        return __import__(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (see `make install`)")
