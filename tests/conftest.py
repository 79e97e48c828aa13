"""Session-wide fixtures: one live server on the default model, shared by every live test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.server import LaunchedServer
from tests.needs import skip_or_fail

# Small limits keep start-up (warmup) short on a 2-core machine.
SMALL_LIMITS = ["--max-batch-prefill-tokens", "1024", "--max-input-tokens", "1000",
                "--max-total-tokens", "2048", "--kv-cache-memory", "512MiB"]


@pytest.fixture(scope="session")
def default_server() -> Iterator[LaunchedServer]:
    server = LaunchedServer(SMALL_LIMITS).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def built_kernels() -> None:
    """The C++ CPU kernels, built and loaded (tests.needs.needs_kernel)."""
    from tgserve.shard.kernels import build

    if not build.available():
        skip_or_fail("C++ CPU kernels could not be built here (no ninja or no C++ compiler)")
