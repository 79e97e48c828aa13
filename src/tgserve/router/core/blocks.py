"""KV block accounting: which cache blocks and slots each request may use (router-owned, pure).

With prefix caching on, every full block of a prompt whose KV has been computed is remembered by a
chained hash of the tokens up to its end. A later prompt that starts with the same tokens reuses
those blocks (reference-counted) and only its remaining tokens run through the model. Blocks nobody
uses any more keep their KV and sit in an LRU list; they are evicted only when a request needs
room the free list cannot give.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

# Block 0 never goes to a request: the health check's dummy prefill writes its one slot there.
HEALTH_BLOCK = 0

BlockHash = int


@dataclass(frozen=True)
class BlockAllocation:
    """The blocks a request owns and its slots (block * block_size + i), one per KV token."""

    id: int
    blocks: tuple[int, ...]
    slots: tuple[int, ...]
    # Prompt tokens whose KV is already in the first blocks (a multiple of the block size).
    prefix_len: int = 0
    # The chained hash of each full prompt block, in order: what `commit` publishes.
    block_hashes: tuple[BlockHash, ...] = ()


def prompt_block_hashes(prompt: Sequence[int], block_size: int) -> tuple[BlockHash, ...]:
    """One hash per full block of `prompt`, each covering every token from the start.

    The last prompt token is left out: its logits are needed, so it always runs through the
    model, and a block is only reusable when every token in it can be skipped.
    """
    hashes: list[BlockHash] = []
    parent: BlockHash = 0
    for end in range(block_size, len(prompt), block_size):
        parent = hash((parent, tuple(prompt[end - block_size : end])))
        hashes.append(parent)
    return tuple(hashes)


@dataclass
class BlockAllocator:
    """Hands out whole blocks; `allocate` fails rather than over-commit."""

    num_blocks: int
    block_size: int
    prefix_caching: bool = False
    _free: list[int] = field(init=False, repr=False)
    _live: dict[int, BlockAllocation] = field(init=False, repr=False, default_factory=dict)
    _ids: itertools.count = field(init=False, repr=False, default_factory=itertools.count)
    # Prefix cache: hash -> block, its inverse, live references per cached block, and the cached
    # blocks nobody references, oldest first (eviction order).
    _cached: dict[BlockHash, int] = field(init=False, repr=False, default_factory=dict)
    _hash_of: dict[int, BlockHash] = field(init=False, repr=False, default_factory=dict)
    _refs: dict[int, int] = field(init=False, repr=False, default_factory=dict)
    _idle: OrderedDict[int, None] = field(init=False, repr=False, default_factory=OrderedDict)

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
        """Blocks a new request can get: never used, or cached but referenced by nobody."""
        return len(self._free) + len(self._idle)

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Blocks whose KV is reusable by a later prompt (in use or idle)."""
        return len(self._cached)

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
        """Reserve room for `tokens` KV entries, or None when the blocks do not suffice.

        `prefix_ids` (the prompt) lets a prefix cache hand back blocks that already hold the KV of
        its first tokens; None means every token must be computed (prompt logprobs need that).
        """
        hashes = (
            prompt_block_hashes(prefix_ids, self.block_size)
            if self.prefix_caching and prefix_ids is not None
            else ()
        )
        reused = self._match(hashes)
        needed = self.blocks_for(tokens) - len(reused)
        revived = sum(1 for b in reused if b in self._idle)
        if needed > len(self._free) + len(self._idle) - revived:
            return None
        for block in reused:
            self._idle.pop(block, None)
            self._refs[block] = self._refs.get(block, 0) + 1
        blocks = tuple(reused) + tuple(self._take() for _ in range(needed))
        slots = tuple(
            itertools.islice(
                (b * self.block_size + i for b in blocks for i in range(self.block_size)),
                max(tokens, 1),
            )
        )
        allocation = BlockAllocation(
            next(self._ids), blocks, slots, len(reused) * self.block_size, hashes
        )
        self._live[allocation.id] = allocation
        return allocation

    def commit(self, allocation: BlockAllocation) -> None:
        """The allocation's prompt KV is now in the cache: publish its full blocks for reuse.

        Called after the prefill that computed them succeeded; before that, another request
        could be handed blocks whose KV does not exist yet.
        """
        if allocation.id not in self._live:
            return
        for block, block_hash in zip(allocation.blocks, allocation.block_hashes):
            if block in self._hash_of or block_hash in self._cached:
                continue  # reused from the cache already, or another request published it first
            self._cached[block_hash] = block
            self._hash_of[block] = block_hash
            self._refs[block] = self._refs.get(block, 0) + 1

    def free(self, allocation: BlockAllocation) -> None:
        """Return the blocks; freeing the same allocation twice is a bug and raises."""
        if self._live.pop(allocation.id, None) is None:
            raise ValueError(f"allocation {allocation.id} is not live (freed twice?)")
        # Reversed so the lowest block is handed out first again.
        for block in reversed(allocation.blocks):
            refs = self._refs.get(block)
            if refs is None:
                self._free.append(block)
            elif refs > 1:
                self._refs[block] = refs - 1
            else:
                del self._refs[block]
                self._idle[block] = None  # keeps its KV until someone needs the room

    def _match(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks of the longest prefix of `hashes`."""
        blocks: list[int] = []
        for block_hash in hashes:
            block = self._cached.get(block_hash)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._idle.popitem(last=False)  # least recently released
        del self._cached[self._hash_of.pop(block)]
        return block
