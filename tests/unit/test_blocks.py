"""Block accounting: block 0 reserved, slots per token, never over-committed."""

import pytest

from tgserve.router.core.blocks import BlockAllocator, prompt_block_hashes


def test_block_zero_is_never_handed_out() -> None:
    allocator = BlockAllocator(num_blocks=4, block_size=2)
    allocation = allocator.allocate(6)
    assert allocation is not None
    assert 0 not in allocation.blocks
    assert sorted(allocation.blocks) == [1, 2, 3]
    assert allocator.allocate(1) is None


@pytest.mark.parametrize(
    ("tokens", "num_blocks_used", "num_slots"),
    [(1, 1, 1), (4, 1, 4), (5, 2, 5), (8, 2, 8), (9, 3, 9)],
)
def test_blocks_and_slots_cover_exactly_the_tokens(
    tokens: int, num_blocks_used: int, num_slots: int
) -> None:
    allocator = BlockAllocator(num_blocks=10, block_size=4)
    allocation = allocator.allocate(tokens)
    assert allocation is not None
    assert len(allocation.blocks) == num_blocks_used
    assert len(allocation.slots) == num_slots
    expected = [b * 4 + i for b in allocation.blocks for i in range(4)][:tokens]
    assert list(allocation.slots) == expected


def test_counts_follow_allocate_and_free() -> None:
    allocator = BlockAllocator(num_blocks=9, block_size=16)
    assert (allocator.total_blocks, allocator.free_blocks, allocator.used_blocks) == (8, 8, 0)
    a = allocator.allocate(40)  # 3 blocks
    b = allocator.allocate(16)  # 1 block
    assert a is not None and b is not None
    assert (allocator.free_blocks, allocator.used_blocks) == (4, 4)
    allocator.free(a)
    assert (allocator.free_blocks, allocator.used_blocks) == (7, 1)
    assert set(a.blocks).isdisjoint(b.blocks)


def test_refuses_rather_than_over_commit_and_recovers_after_free() -> None:
    allocator = BlockAllocator(num_blocks=5, block_size=4)  # 4 usable blocks
    first = allocator.allocate(12)
    assert first is not None
    assert allocator.allocate(5) is None  # needs 2, 1 left
    assert allocator.free_blocks == 1  # a failed allocation takes nothing
    allocator.free(first)
    second = allocator.allocate(16)
    assert second is not None and len(second.blocks) == 4


def test_live_allocations_never_share_a_slot() -> None:
    allocator = BlockAllocator(num_blocks=50, block_size=3)
    live = [allocator.allocate(n) for n in (1, 7, 3, 10, 2, 5)]
    slots = [s for a in live if a is not None for s in a.slots]
    assert len(slots) == len(set(slots)) == 1 + 7 + 3 + 10 + 2 + 5


def test_double_free_raises() -> None:
    allocator = BlockAllocator(num_blocks=3, block_size=1)
    allocation = allocator.allocate(1)
    assert allocation is not None
    allocator.free(allocation)
    with pytest.raises(ValueError):
        allocator.free(allocation)


def test_can_ever_fit_counts_only_usable_blocks() -> None:
    allocator = BlockAllocator(num_blocks=3, block_size=4)
    assert allocator.total_tokens == 8
    assert allocator.can_ever_fit(8)
    assert not allocator.can_ever_fit(9)


# ---- prefix caching -------------------------------------------------------------------------

# 11 tokens: 2 full blocks of 4 can be skipped, the 3rd holds the end.
PROMPT = list(range(100, 111))


def cached_allocator(num_blocks: int = 12) -> BlockAllocator:
    return BlockAllocator(num_blocks=num_blocks, block_size=4, prefix_caching=True)


def test_nothing_is_reused_before_the_prefill_commits() -> None:
    allocator = cached_allocator()
    first = allocator.allocate(len(PROMPT) + 4, PROMPT)
    second = allocator.allocate(len(PROMPT) + 4, PROMPT)
    assert first is not None and second is not None
    assert second.prefix_len == 0 and set(first.blocks).isdisjoint(second.blocks)


def test_a_committed_prompt_is_reused_block_for_block() -> None:
    allocator = cached_allocator()
    first = allocator.allocate(len(PROMPT) + 4, PROMPT)
    assert first is not None
    allocator.commit(first)
    longer = PROMPT[:9] + [7, 7, 7]  # shares 9 tokens: 2 full blocks
    second = allocator.allocate(len(longer) + 4, longer)
    assert second is not None
    assert second.prefix_len == 8
    assert second.blocks[:2] == first.blocks[:2]
    assert set(second.blocks[2:]).isdisjoint(first.blocks)
    # A different first block changes every hash after it: nothing is reused.
    other = allocator.allocate(20, [1] + PROMPT[1:])
    assert other is not None and other.prefix_len == 0


def test_the_last_prompt_token_is_never_cached() -> None:
    allocator = cached_allocator()
    prompt = list(range(8))  # exactly 2 blocks: only the first may be skipped
    first = allocator.allocate(12, prompt)
    assert first is not None
    allocator.commit(first)
    again = allocator.allocate(12, prompt)
    assert again is not None and again.prefix_len == 4


def test_freed_cached_blocks_stay_reusable_until_evicted() -> None:
    allocator = cached_allocator(num_blocks=6)  # 5 usable blocks
    first = allocator.allocate(len(PROMPT), PROMPT)  # 3 blocks
    assert first is not None
    allocator.commit(first)
    allocator.free(first)
    assert allocator.free_blocks == 5 and allocator.cached_blocks == 2
    again = allocator.allocate(len(PROMPT), PROMPT)
    assert again is not None and again.prefix_len == 8
    assert allocator.used_blocks == 3
    allocator.free(again)
    # Room is needed: the idle cached blocks are evicted, least recently released first.
    big = allocator.allocate(20, [1] * 20)
    assert big is not None and len(big.blocks) == 5
    assert allocator.cached_blocks == 0
    allocator.free(big)
    miss = allocator.allocate(len(PROMPT), PROMPT)
    assert miss is not None and miss.prefix_len == 0


def test_shared_blocks_return_only_when_the_last_user_frees() -> None:
    allocator = cached_allocator(num_blocks=9)  # 8 usable
    first = allocator.allocate(len(PROMPT) + 1, PROMPT)  # 3 blocks
    assert first is not None
    allocator.commit(first)
    second = allocator.allocate(len(PROMPT) + 1, PROMPT)  # 2 shared + 1 own
    assert second is not None
    assert allocator.used_blocks == 4
    allocator.free(first)
    assert allocator.used_blocks == 3  # the shared 2 are still used by `second`
    # An allocation may not take blocks `second` still reads.
    assert allocator.allocate(4 * 6, [5] * 24) is None
    filler = allocator.allocate(4 * 5, [5] * 20)
    assert filler is not None and set(filler.blocks).isdisjoint(second.blocks)
    allocator.free(second)
    allocator.free(filler)
    assert allocator.used_blocks == 0


def test_a_failed_allocation_takes_nothing_and_revives_nothing() -> None:
    allocator = cached_allocator(num_blocks=5)  # 4 usable
    first = allocator.allocate(len(PROMPT), PROMPT)
    assert first is not None
    allocator.commit(first)
    allocator.free(first)
    # Reusing 2 idle blocks still leaves only 2 others for the 3 more this one needs.
    assert allocator.allocate(len(PROMPT) + 10, PROMPT) is None
    assert allocator.free_blocks == 4 and allocator.cached_blocks == 2


def test_prefix_caching_off_ignores_the_prompt() -> None:
    allocator = BlockAllocator(num_blocks=12, block_size=4)
    first = allocator.allocate(len(PROMPT), PROMPT)
    assert first is not None
    allocator.commit(first)
    second = allocator.allocate(len(PROMPT), PROMPT)
    assert second is not None and second.prefix_len == 0


# ---- a prefix cache that cannot be poisoned --------------------------------------------------


def colliding_allocator(num_blocks: int = 12) -> BlockAllocator:
    """Every block digest is the same: only the token check keeps tenants apart."""
    return BlockAllocator(num_blocks=num_blocks, block_size=4, prefix_caching=True,
                          digest=lambda parent, tokens: b"same")


def test_a_colliding_block_is_not_served_another_prompts_kv() -> None:
    allocator = colliding_allocator()
    victim = allocator.allocate(len(PROMPT) + 4, PROMPT)
    assert victim is not None
    allocator.commit(victim)
    attacker = [9] * len(PROMPT)  # another prompt, the same key for every block
    stolen = allocator.allocate(len(attacker) + 4, attacker)
    assert stolen is not None and stolen.prefix_len == 0
    assert set(stolen.blocks).isdisjoint(victim.blocks)
    # The victim's own tokens still hit: the check refuses other tokens, not the cache.
    again = allocator.allocate(len(PROMPT) + 4, PROMPT)
    assert again is not None and again.prefix_len == 4  # block 2 shares block 1's key: not cached


def test_a_collision_after_a_shared_block_reuses_only_the_shared_one() -> None:
    allocator = BlockAllocator(num_blocks=12, block_size=4, prefix_caching=True,
                               digest=lambda parent, tokens: bytes([len(parent)]))
    victim = allocator.allocate(len(PROMPT) + 4, PROMPT)
    assert victim is not None
    allocator.commit(victim)
    attacker = PROMPT[:4] + [9] * 7  # the first block is truly shared, the second only by key
    served = allocator.allocate(len(attacker) + 4, attacker)
    assert served is not None and served.prefix_len == 4
    assert served.blocks[0] == victim.blocks[0] and served.blocks[1] not in victim.blocks


def test_a_block_cached_again_under_other_tokens_is_no_parent_to_old_children() -> None:
    """Evicted and re-published, a block gets a new identity: the child that was computed after
    its old tokens, still cached under a colliding key, does not chain onto its new tokens."""
    allocator = BlockAllocator(num_blocks=4, block_size=4, prefix_caching=True,
                               digest=lambda parent, tokens: bytes([len(parent)]))
    first = allocator.allocate(8, PROMPT[:9])  # blocks X, Y: both cached, Y after X
    assert first is not None
    allocator.commit(first)
    filler = allocator.allocate(4)  # holds the spare block, so that the next one evicts
    assert filler is not None
    allocator.free(first)
    x, y = first.blocks
    allocator._idle.move_to_end(y)  # the parent X idles longest: evicted first, Y stays cached
    other = allocator.allocate(4, [5] * 4 + [6])  # takes X and publishes it with other tokens
    assert other is not None and other.blocks == (x,)
    allocator.commit(other)
    allocator.free(other)
    allocator.free(filler)
    mixed = [5] * 4 + PROMPT[4:8] + [1]  # Y's tokens after X's new ones, Y's key by collision
    served = allocator.allocate(8, mixed)  # two blocks: X again, and the spare one
    assert served is not None and served.prefix_len == 4 and y not in served.blocks


def test_the_default_digest_is_a_cryptographic_chain() -> None:
    allocator = cached_allocator()
    one = allocator.allocate(len(PROMPT), PROMPT)
    two = allocator.allocate(len(PROMPT), [1] + PROMPT[1:])
    assert one is not None and two is not None
    assert all(isinstance(h, bytes) and len(h) == 16 for h in one.block_hashes)
    assert one.block_hashes[1] != two.block_hashes[1]  # the chain carries the first block


# ---- cache salts: tenants never share blocks ---------------------------------------------------


def test_requests_share_cached_blocks_only_under_the_same_salt() -> None:
    allocator = cached_allocator()
    alice = allocator.allocate(len(PROMPT) + 4, PROMPT, salt=b"alice")
    assert alice is not None
    allocator.commit(alice)
    for salt in (b"", b"bob"):
        other = allocator.allocate(len(PROMPT) + 4, PROMPT, salt=salt)
        assert other is not None and other.prefix_len == 0
        assert set(other.blocks).isdisjoint(alice.blocks)
        allocator.free(other)
    again = allocator.allocate(len(PROMPT) + 4, PROMPT, salt=b"alice")
    assert again is not None and again.prefix_len == 8 and again.blocks[:2] == alice.blocks[:2]


def test_a_salt_keeps_tenants_apart_even_when_every_digest_collides() -> None:
    allocator = colliding_allocator()
    victim = allocator.allocate(len(PROMPT) + 4, PROMPT, salt=b"tenant-a")
    assert victim is not None
    allocator.commit(victim)
    same_tokens = allocator.allocate(len(PROMPT) + 4, PROMPT, salt=b"tenant-b")
    assert same_tokens is not None and same_tokens.prefix_len == 0


def test_an_unsalted_chain_keeps_its_keys() -> None:
    # b"" is "no salt": keys published before salts existed (or by unsalted requests) still hit.
    assert prompt_block_hashes([(1, 2)]) == prompt_block_hashes([(1, 2)], salt=b"")
    assert prompt_block_hashes([(1, 2)]) != prompt_block_hashes([(1, 2)], salt=b"x")
