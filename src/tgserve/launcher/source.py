"""What model resolution hands the launcher: light, so that the launcher can hold it.

Resolution itself (weights.py) imports huggingface_hub, which the launcher would keep resident
for the server's whole life; it runs in a child process, and only these types come back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ModelResolutionError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """What the shards and the router load. `revision` is the hub commit the snapshot holds."""

    model_id: str
    path: Path  # config.json + tokenizer files (+ safetensors unless gguf_file is set)
    gguf_file: Path | None
    revision: str | None
