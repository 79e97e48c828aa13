"""Physical paged KV cache: per layer, K and V addressed by slot (block * block_size + offset)."""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Which slots a request owns is decided by the router; the shard only reads and writes them."""

    keys: list[torch.Tensor]  # per layer: [num_slots, kv_heads, head_dim]
    values: list[torch.Tensor]
    block_size: int
    # The anonymous mapping behind a CPU cache, whose pages can be handed back to the OS.
    buffer: mmap.mmap | None = None

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        shape = (2, num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        # Zeros, not empty: padded reads of unwritten slots are masked out; 0 * NaN would not be.
        buffer = None
        if device.type == "cpu":
            cache, buffer = _lazy_zeros(shape, dtype)
        else:
            cache = torch.zeros(shape, dtype=dtype, device=device)
        return cls(list(cache[0].unbind(0)), list(cache[1].unbind(0)), block_size, buffer)

    def forget(self) -> None:
        """Every slot back to zero. On CPU the pages go back to the OS (resident memory falls to
        what requests write next): after warmup, which fills the cache with throwaway values."""
        if self.buffer is not None:
            self.buffer.madvise(mmap.MADV_DONTNEED)  # private anonymous pages read back as zeros
            return
        for t in (*self.keys, *self.values):
            t.zero_()

    def release(self, slots: Sequence[int]) -> None:
        """The pages that hold only `slots` (in every layer's K and V) back to the OS; they read
        back as zeros. For a finished request whose blocks no prefix cache keeps: a CPU cache
        otherwise stays as resident as the most it ever held, however few requests run now."""
        if self.buffer is None or not slots:
            return
        slot_bytes = self.keys[0][0].nbytes
        tensor_bytes = self.num_slots * slot_bytes
        page = mmap.PAGESIZE
        runs = _runs(sorted(slots))
        for index in range(2 * len(self.keys)):  # [2, layers] tensors, one after the other
            base = index * tensor_bytes
            for first, stop in runs:
                start = -(-(base + first * slot_bytes) // page) * page  # whole pages only
                end = (base + stop * slot_bytes) // page * page
                if end > start:
                    self.buffer.madvise(mmap.MADV_DONTNEED, start, end - start)

    @property
    def num_slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def num_blocks(self) -> int:
        return self.num_slots // self.block_size

    @staticmethod
    def bytes_per_token(
        num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.finfo(dtype).bits // 8

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [T, kv_heads, head_dim] for the T slots given, rounded to the cache's dtype."""
        self.keys[layer].index_copy_(0, slots, k.to(self.keys[layer].dtype))
        self.values[layer].index_copy_(0, slots, v.to(self.values[layer].dtype))


def _runs(sorted_slots: list[int]) -> list[tuple[int, int]]:
    """[first, stop) ranges of consecutive slots."""
    runs: list[tuple[int, int]] = []
    for slot in sorted_slots:
        if runs and runs[-1][1] == slot:
            runs[-1] = (runs[-1][0], slot + 1)
        else:
            runs.append((slot, slot + 1))
    return runs


def _lazy_zeros(
    shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[torch.Tensor, mmap.mmap | None]:
    """Zeros in fresh anonymous memory: the kernel hands out zero pages on first touch, so the
    cache costs resident memory only for the blocks requests have written, not its full size."""
    size = math.prod(shape) * torch.finfo(dtype).bits // 8
    if size == 0:
        return torch.zeros(shape, dtype=dtype), None
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    # The tensor keeps `buffer` alive; it is unmapped when the last view of the cache goes.
    return torch.frombuffer(buffer, dtype=dtype).view(shape), buffer
