"""A live server on the default model for the official client packages (one per session)."""

from __future__ import annotations

import pytest

from tests.integration.server import LaunchedServer


@pytest.fixture(scope="session")
def server(default_server: LaunchedServer) -> LaunchedServer:
    """The session's shared server on the default model (tests/conftest.py)."""
    return default_server
