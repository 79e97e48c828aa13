"""docs/architecture.md is the module map that scripts/architecture.py generates: regenerate it
when a module is added, moved or its docstring changes; every module needs a docstring."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "architecture.py"


def _script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("architecture", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_architecture_doc_is_current() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_module_without_docstring_is_reported(tmp_path: Path) -> None:
    package = tmp_path / "tgserve" / "part"
    package.mkdir(parents=True)
    (tmp_path / "tgserve" / "__init__.py").write_text('"""The package."""\n')
    (package / "__init__.py").write_text('"""A part,\nin two lines.\n\nDetails."""\n')
    (package / "told.py").write_text('"""Says what it is."""\n')
    (package / "silent.py").write_text("x = 1  # no docstring\n")
    (package / "kernel.cpp").write_text("// A kernel.\n//\n// More.\n#include <x>\n")

    text, missing = _script().render(tmp_path)

    assert missing == ["tgserve/part/silent.py"]
    assert "### `tgserve/part/`\n\nA part, in two lines.\n\n- `kernel.cpp`: A kernel.\n" in text
    assert "- `told.py`: Says what it is." in text
