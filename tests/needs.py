"""What a test needs of the machine: missing, the test skips, except under CI=true: it fails."""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """A skip on a developer's machine; under CI=true a failure, so nothing is silently left out."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing requirement fails the test)", pytrace=False)
    pytest.skip(reason)


def require(module: str) -> ModuleType:
    """Import a client package; missing, the test skips (and fails under CI=true)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        skip_or_fail(f"{module} is not installed (see `make install`)")


# For the tests of the C++ kernels: the `built_kernels` fixture (tests/conftest.py) builds them,
# skipping where they cannot be built (no ninja or no C++ compiler) and failing under CI=true.
needs_kernel = pytest.mark.usefixtures("built_kernels")
