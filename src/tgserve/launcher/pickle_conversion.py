"""Converts pickle (pytorch_model*.bin) weights to safetensors, once, when the user allows it.

Its own module, run in a child process (tgserve.isolated), so that the launcher never imports torch.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tgserve.launcher.weights import PICKLE_GLOB, ModelResolutionError

log = logging.getLogger(__name__)


def convert_bin_to_safetensors(folder: Path) -> list[Path]:
    """Writes X.safetensors for each pytorch_X.bin in `folder` (and the index); returns them."""
    written: list[Path] = []
    for source in sorted(folder.glob(PICKLE_GLOB)):
        target = folder / (source.name.removeprefix("pytorch_")[: -len(".bin")] + ".safetensors")
        if not target.exists():
            state = torch.load(source, map_location="cpu", weights_only=True)
            tensors = _without_shared_storage(
                {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            )
            _save_safetensors(tensors, target)
            log.info("converted %s to %s (%d tensors)", source.name, target.name, len(tensors))
        written.append(target)
    if (folder / "pytorch_model.bin.index.json").exists():
        written.append(_write_index(folder, written))
    return written


def _without_shared_storage(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keeps one name per storage (tied weights); safetensors refuses tensors that share memory."""
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, t in state.items():
        key = (
            (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
            )
            if t.numel()
            else (name,)
        )
        groups.setdefault(key, []).append(name)
    kept: dict[str, torch.Tensor] = {}
    for names in groups.values():
        # A tied lm_head is rebuilt from the embedding at load time, so the embedding's name stays.
        keep = min(names, key=lambda n: (n.startswith("lm_head."), names.index(n)))
        if len(names) > 1:
            log.info("dropping %s: same storage as %s", [n for n in names if n != keep], keep)
        t = state[keep].contiguous()
        kept[keep] = t if t.untyped_storage().nbytes() == t.nbytes else t.clone()
    return kept


def _save_safetensors(tensors: dict[str, torch.Tensor], target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    with safe_open(str(tmp), framework="pt") as f:
        for name, tensor in tensors.items():
            if not torch.equal(f.get_tensor(name), tensor):
                tmp.unlink()
                raise ModelResolutionError(f"converting {target.name}: {name} did not round-trip")
    os.replace(tmp, target)


def _write_index(folder: Path, files: list[Path]) -> Path:
    weight_map: dict[str, str] = {}
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                weight_map[name] = file.name
                sliced = f.get_slice(name)
                total += _nbytes(sliced.get_shape(), sliced.get_dtype())
    index = folder / "model.safetensors.index.json"
    body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    index.write_text(json.dumps(body, indent=2))
    return index


def _nbytes(shape: list[int], dtype: str) -> int:
    bits = {"F64": 64, "I64": 64, "F32": 32, "I32": 32, "F16": 16, "BF16": 16, "I16": 16}
    count = 1
    for dim in shape:
        count *= dim
    return count * bits.get(dtype, 8) // 8
