"""Package boundaries: the shard and the shared modules import nothing from the router, and the
router's core knows neither protobuf nor the HTTP layer."""

from __future__ import annotations

import ast
from pathlib import Path

import tgserve

SRC = Path(tgserve.__file__).parent


def imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def offenders(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(SRC)} imports {name}"
        for path in files
        for name in imported_modules(path)
        if name.startswith(forbidden)
    ]


def test_the_shard_imports_nothing_from_the_router() -> None:
    files = sorted((SRC / "shard").rglob("*.py"))
    assert files
    assert offenders(files, ("tgserve.router",)) == []


def test_shared_tracing_imports_nothing_from_the_router() -> None:
    assert offenders([SRC / "tracing.py"], ("tgserve.router",)) == []


def test_the_core_knows_no_protobuf_torch_or_http() -> None:
    files = sorted((SRC / "router" / "core").rglob("*.py"))
    assert files
    forbidden = (
        "tgserve.pb", "google.protobuf", "grpc", "torch", "fastapi", "starlette",
        "tgserve.router.shard_client", "tgserve.router.native", "tgserve.router.openai",
    )
    assert offenders(files, forbidden) == []
