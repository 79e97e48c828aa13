"""Named tensors from safetensors files or an in-memory dict, cast and sliced for this rank."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open


class WeightsError(RuntimeError):
    pass


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files, in the order the index names them when there is one."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in dict.fromkeys(weight_map.values())]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no *.safetensors files in {folder}")
    return files


class Weights:
    """The only door to checkpoint tensors: layers ask it for whole or rank-sharded tensors.

    Safetensors are memory-mapped and read lazily, one tensor at a time, so loading never holds a
    second copy of the model.
    """

    def __init__(
        self,
        source: Iterable[Path] | Mapping[str, torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.dtype = dtype
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self._tensors: Mapping[str, torch.Tensor] | None = None
        self._routing: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        if isinstance(source, Mapping):
            self._tensors = source
        else:
            for path in source:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        if name in self._routing:
                            raise WeightsError(
                                f"tensor {name} is in both {self._routing[name]} and {path}")
                        self._routing[name] = path

    def close(self) -> None:
        """Drop the memory maps once the model holds its own copies (their pages count as resident
        memory for as long as they are mapped)."""
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self._tensors.keys()) if self._tensors is not None else list(self._routing)

    def has(self, name: str) -> bool:
        return name in (self._tensors if self._tensors is not None else self._routing)

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path]

    def _slice(self, name: str):
        if self._tensors is not None:
            if name not in self._tensors:
                raise WeightsError(f"weight {name} does not exist")
            return self._tensors[name]
        if name not in self._routing:
            raise WeightsError(f"weight {name} does not exist")
        return self._handle(self._routing[name]).get_slice(name)

    def _finish(self, tensor: torch.Tensor) -> torch.Tensor:
        read = tensor
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.to(self.device).contiguous()
        shares_storage = tensor.untyped_storage().data_ptr() == read.untyped_storage().data_ptr()
        if self._tensors is None and shares_storage:
            # safetensors hands out views of its memory map: a tensor kept as read would keep the
            # whole file mapped, and every page it ever touched resident.
            tensor = tensor.clone()
        return tensor

    def get_tensor(self, name: str) -> torch.Tensor:
        item = self._slice(name)
        return self._finish(item if isinstance(item, torch.Tensor) else item[:])

    def get_sharded(self, name: str, dim: int) -> torch.Tensor:
        """This rank's contiguous part of `name` along `dim` (which must divide evenly)."""
        item = self._slice(name)
        shape = item.shape if isinstance(item, torch.Tensor) else item.get_shape()
        size = shape[dim]
        if size % self.world_size != 0:
            raise WeightsError(
                f"cannot shard {name} of size {size} on dim {dim} over {self.world_size} ranks"
            )
        block = size // self.world_size
        start, stop = self.rank * block, (self.rank + 1) * block
        if dim == 0:
            part = item[start:stop]
        elif dim == 1:
            part = item[:, start:stop]
        else:
            raise WeightsError(f"sharding on dim {dim} is not supported")
        return self._finish(part)

    def get_multi_sharded(self, names: list[str], dim: int) -> torch.Tensor:
        """Several tensors sharded alike and concatenated (fused q/k/v or gate/up projections)."""
        return torch.cat([self.get_sharded(name, dim) for name in names], dim=dim)

    def get_optional_multi_sharded(self, names: list[str], dim: int) -> torch.Tensor | None:
        present = [self.has(name) for name in names]
        if not any(present):
            return None
        if not all(present):
            missing = [n for n, p in zip(names, present) if not p]
            raise WeightsError(f"weights {missing} are missing while their siblings exist")
        return self.get_multi_sharded(names, dim)
