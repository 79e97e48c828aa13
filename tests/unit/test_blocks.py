"""Block accounting: block 0 reserved, slots per token, never over-committed."""

import pytest

from tgserve.router.blocks import BlockAllocator


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
