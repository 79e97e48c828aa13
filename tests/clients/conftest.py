"""A live server on the default model for the official client packages (one per session)."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

from tests.integration.server import LaunchedServer


@pytest.fixture(scope="session")
def server(default_server: LaunchedServer) -> LaunchedServer:
    """The session's shared server on the default model (tests/conftest.py)."""
    return default_server


def require(module: str) -> ModuleType:
    """Import a client package; missing, the test skips (and fails under CI=true)."""
    if os.environ.get("CI", "").lower() == "true":
        return __import__(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (see `make install`)")
