"""A wheel of the project, installed in a fresh venv, builds the C++ kernels from its own files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.needs import needs_kernel

ROOT = Path(__file__).resolve().parents[2]

# Run by the fresh venv's python: tgserve from that venv, torch and the rest from the dev venv.
CHECK = """
import os, sys
from pathlib import Path

import torch
import tgserve
from tgserve.shard.kernels import build, fused, select_ops, torch_ops

package = Path(tgserve.__file__).resolve()
assert package.is_relative_to(Path(sys.prefix).resolve()), package  # not the editable checkout
ops = select_ops("cpu")
assert ops.name == "cpu", "the kernels did not build from the installed sources"
assert build.built_capability() == build.cpu_capability()
built = build.build_directory(build.built_capability())
assert built.is_relative_to(Path(os.environ["TGSERVE_CACHE"])) and list(built.glob("*.so")), built
x, weight = torch.randn(3, 64), torch.rand(64)
torch.testing.assert_close(fused.rms_norm(x, weight, 1e-6), torch_ops.rms_norm(x, weight, 1e-6))
print("kernels built from", package.parent)
"""


def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


# A wheel, a venv and a full build of the kernels: about a minute on 2 idle cores.
@needs_kernel
def test_an_installed_wheel_builds_its_kernels(tmp_path: Path) -> None:
    # A copy of the sources: setuptools builds in the tree it is given, and a stale build/ there
    # would put files into the wheel that the sources no longer have.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(
        ROOT / "src", project / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.so", "*.o"),
    )  # fmt: skip
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", dist, project)  # fmt: skip
    (wheel,) = dist.glob("tgserve-*.whl")

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel)

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    # Only a site directory's .pth files are read, so the dev venv's editable tgserve stays out.
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    env["TGSERVE_CACHE"] = str(tmp_path / "cache")
    # The dev venv's bin (ninja, when pip installed it) for the build.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = run(python, "-c", CHECK, env=env, cwd=tmp_path)
    assert str(venv.resolve()) in done.stdout
