"""KV block accounting: which cache blocks and slots each request may use (router-owned, pure)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

# Block 0 never goes to a request: the health check's dummy prefill writes its one slot there.
HEALTH_BLOCK = 0


@dataclass(frozen=True)
class BlockAllocation:
    """The blocks a request owns and its slots (block * block_size + i), one per KV token."""

    id: int
    blocks: tuple[int, ...]
    slots: tuple[int, ...]
    # Prompt tokens whose KV is already cached; always 0 until a prefix cache exists.
    prefix_len: int = 0


@dataclass
class BlockAllocator:
    """Hands out whole blocks from a free list; `allocate` fails rather than over-commit."""

    num_blocks: int
    block_size: int
    _free: list[int] = field(init=False, repr=False)
    _live: dict[int, BlockAllocation] = field(init=False, repr=False, default_factory=dict)
    _ids: itertools.count = field(init=False, repr=False, default_factory=itertools.count)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (block 0 included), got {self.num_blocks}")
        # Popped from the end, so requests get ascending block ids: easier to read in logs.
        self._free = list(range(self.num_blocks - 1, HEALTH_BLOCK, -1))

    @property
    def total_blocks(self) -> int:
        """Blocks requests can ever use (all but the health block)."""
        return self.num_blocks - 1

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - len(self._free)

    @property
    def total_tokens(self) -> int:
        """KV tokens requests can ever use."""
        return self.total_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-max(tokens, 1) // self.block_size)

    def can_ever_fit(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.total_blocks

    def allocate(
        self, tokens: int, prefix_ids: Sequence[int] | None = None
    ) -> BlockAllocation | None:
        """Reserve room for `tokens` KV entries, or None when the free blocks do not suffice.

        `prefix_ids` is where a prefix cache would look for reusable blocks; it is ignored for now.
        """
        del prefix_ids
        needed = self.blocks_for(tokens)
        if needed > len(self._free):
            return None
        blocks = tuple(self._free.pop() for _ in range(needed))
        slots = tuple(
            itertools.islice(
                (b * self.block_size + i for b in blocks for i in range(self.block_size)),
                max(tokens, 1),
            )
        )
        allocation = BlockAllocation(next(self._ids), blocks, slots)
        self._live[allocation.id] = allocation
        return allocation

    def free(self, allocation: BlockAllocation) -> None:
        """Return the blocks; freeing the same allocation twice is a bug and raises."""
        if self._live.pop(allocation.id, None) is None:
            raise ValueError(f"allocation {allocation.id} is not live (freed twice?)")
        # Reversed so the lowest block is handed out first again.
        self._free.extend(reversed(allocation.blocks))
