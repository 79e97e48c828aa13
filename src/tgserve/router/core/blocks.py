"""KV block accounting: which cache blocks and slots each request may use (router-owned, pure).

With prefix caching on, every full block of a prompt whose KV has been computed is remembered by a
chained digest of the tokens up to its end. A later prompt that starts with the same tokens reuses
those blocks (reference-counted) and only its remaining tokens run through the model. The digest
is BLAKE2b, and a hit is also checked token by token along the chain, so no prompt, however
crafted, is served KV computed for other tokens (Python's hash() of ints is neither randomised
nor collision-resistant: vLLM's CVE-2025-25183). A request's cache salt (per tenant) starts its
chain, so requests with different salts never share a block, nor learn from a hit's speed that
another tenant sent the same prompt. Blocks nobody
uses any more keep their KV and sit in an LRU list; they are evicted only when a request needs
room the free list cannot give.
"""

from __future__ import annotations

import hashlib
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# Block 0 never goes to a request: the health check's dummy prefill writes its one slot there.
HEALTH_BLOCK = 0

BlockHash = bytes
BlockTokens = tuple[int, ...]
# (the parent block's digest, this block's tokens) -> this block's digest
Digest = Callable[[BlockHash, BlockTokens], BlockHash]


def chain_digest(parent: BlockHash, tokens: BlockTokens) -> BlockHash:
    """128-bit BLAKE2b of the parent's digest and the block's token ids."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


@dataclass(frozen=True)
class BlockAllocation:
    """The blocks a request owns and its slots (block * block_size + i), one per KV token."""

    id: int
    blocks: tuple[int, ...]
    slots: tuple[int, ...]
    # Prompt tokens whose KV is already in the first blocks (a multiple of the block size).
    prefix_len: int = 0
    # The chained digest of each full prompt block, and its tokens, in order: what `commit`
    # publishes.
    block_hashes: tuple[BlockHash, ...] = ()
    block_tokens: tuple[BlockTokens, ...] = ()
    salt: bytes = b""


@dataclass(frozen=True)
class _CachedBlock:
    """What a cached block holds: its tokens, after the entry `parent` (for a prompt's first
    block, the salt's bytes: b"" without one).

    `seq` numbers publications and is never reused, so a block evicted and cached again under
    other tokens cannot pass for the parent its old children were computed after."""

    seq: int
    parent: int | bytes
    tokens: BlockTokens


def prompt_blocks(prompt: Sequence[int], block_size: int) -> tuple[BlockTokens, ...]:
    """The tokens of each full block of `prompt` that the prefix cache may hold.

    The last prompt token is left out: its logits are needed, so it always runs through the
    model, and a block is only reusable when every token in it can be skipped.
    """
    return tuple(tuple(prompt[end - block_size : end])
                 for end in range(block_size, len(prompt), block_size))


def salt_root(salt: bytes) -> BlockHash:
    """Where a salted chain starts: b"" (no salt) keeps unsalted keys as they were."""
    return hashlib.blake2b(b"cache-salt\0" + salt, digest_size=16).digest() if salt else b""


def prompt_block_hashes(
    blocks: Sequence[BlockTokens], digest: Digest = chain_digest, salt: bytes = b""
) -> tuple[BlockHash, ...]:
    """One digest per block, each covering the salt and every token from the prompt's start."""
    hashes: list[BlockHash] = []
    parent = salt_root(salt)
    for tokens in blocks:
        parent = digest(parent, tokens)
        hashes.append(parent)
    return tuple(hashes)


@dataclass
class BlockAllocator:
    """Hands out whole blocks; `allocate` fails rather than over-commit."""

    num_blocks: int
    block_size: int
    prefix_caching: bool = False
    digest: Digest = chain_digest  # tests inject a weak one to force collisions
    _free: list[int] = field(init=False, repr=False)
    _live: dict[int, BlockAllocation] = field(init=False, repr=False, default_factory=dict)
    _ids: itertools.count = field(init=False, repr=False, default_factory=itertools.count)
    # Prefix cache: digest -> block, its inverse, what each cached block holds, live references
    # per cached block, and the cached blocks nobody references, oldest first (eviction order).
    _cached: dict[BlockHash, int] = field(init=False, repr=False, default_factory=dict)
    _hash_of: dict[int, BlockHash] = field(init=False, repr=False, default_factory=dict)
    _holds: dict[int, _CachedBlock] = field(init=False, repr=False, default_factory=dict)
    _seqs: itertools.count = field(init=False, repr=False, default_factory=itertools.count)
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
        self, tokens: int, prefix_ids: Sequence[int] | None = None, salt: bytes = b""
    ) -> BlockAllocation | None:
        """Reserve room for `tokens` KV entries, or None when the blocks do not suffice.

        `prefix_ids` (the prompt) lets a prefix cache hand back blocks that already hold the KV of
        its first tokens; None means every token must be computed (prompt logprobs need that).
        Only blocks published under the same `salt` are handed back.
        """
        full = (
            prompt_blocks(prefix_ids, self.block_size)
            if self.prefix_caching and prefix_ids is not None
            else ()
        )
        hashes = prompt_block_hashes(full, self.digest, salt)
        reused = self._match(hashes, full, salt)
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
            next(self._ids), blocks, slots, len(reused) * self.block_size, hashes, full, salt
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
        parent: int | bytes = allocation.salt
        for block, key, tokens in zip(
            allocation.blocks, allocation.block_hashes, allocation.block_tokens
        ):
            cached = self._cached.get(key)
            if cached is not None:  # reused from the cache, or another request published it first
                held = self._holds[cached]
                if held.parent != parent or held.tokens != tokens:
                    return  # the key is taken by other tokens: publish nothing after it
                parent = held.seq
                continue
            held = _CachedBlock(next(self._seqs), parent, tokens)
            self._cached[key] = block
            self._hash_of[block] = key
            self._holds[block] = held
            self._refs[block] = self._refs.get(block, 0) + 1
            parent = held.seq

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

    def _match(
        self, hashes: Sequence[BlockHash], tokens: Sequence[BlockTokens], salt: bytes
    ) -> list[int]:
        """The cached blocks of the longest prefix of `hashes` that hold exactly `tokens`, each
        after the one before, the first after `salt`: a digest match alone is never trusted."""
        blocks: list[int] = []
        parent: int | bytes = salt
        for key, block_tokens in zip(hashes, tokens):
            block = self._cached.get(key)
            if block is None:
                break
            held = self._holds[block]
            if held.parent != parent or held.tokens != block_tokens:
                break
            blocks.append(block)
            parent = held.seq
        return blocks

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        block, _ = self._idle.popitem(last=False)  # least recently released
        del self._cached[self._hash_of.pop(block)]
        del self._holds[block]
        return block
