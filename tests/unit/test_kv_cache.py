"""The CPU KV cache: zeros that cost resident memory only where requests wrote."""

from __future__ import annotations

import torch

from tgserve.shard.kv_cache import KVCache


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_cpu_cache_is_zero_and_resident_only_where_written() -> None:
    before = _rss_bytes()
    # 24 layers x 65536 slots x 4 heads x 64 x 4 bytes x (K and V) = 3 GiB of address space.
    cache = KVCache.allocate(24, 4096, 16, 4, 64, torch.float32, torch.device("cpu"))
    assert cache.num_slots == 65536 and len(cache.keys) == len(cache.values) == 24
    assert cache.keys[0].is_contiguous() and cache.values[23].shape == (65536, 4, 64)
    slots = torch.arange(0, 2048)
    k = torch.ones(2048, 4, 64)
    for layer in range(24):
        cache.write(layer, slots, k, 2 * k)
    grown = _rss_bytes() - before
    # Written: 24 x 2048 x 4 x 64 x 4 x 2 = 96 MiB; far from the 3 GiB reserved.
    assert grown < 400 * 2**20, f"resident memory grew by {grown / 2**20:.0f} MiB"
    assert cache.keys[5][:2048].eq(1).all() and cache.values[5][:2048].eq(2).all()
    # Unwritten slots read as zeros (padded reads are masked, and 0 * NaN would not be).
    assert cache.keys[5][2048:4096].eq(0).all() and cache.values[23][-16:].eq(0).all()
    # Layers do not alias each other.
    assert cache.keys[0].data_ptr() != cache.keys[1].data_ptr() != cache.values[0].data_ptr()


def test_forget_zeroes_the_cache_and_returns_its_pages() -> None:
    cache = KVCache.allocate(8, 2048, 16, 4, 64, torch.float32, torch.device("cpu"))
    slots = torch.arange(0, 16384)
    for layer in range(8):
        cache.write(layer, slots, torch.ones(16384, 4, 64), torch.ones(16384, 4, 64))
    filled = _rss_bytes()
    cache.forget()
    # Written: 8 x 16384 x 4 x 64 x 4 x 2 = 256 MiB, all of it given back.
    assert filled - _rss_bytes() > 200 * 2**20
    assert cache.keys[3].eq(0).all() and cache.values[7].eq(0).all()
    cache.write(0, slots[:2], torch.full((2, 4, 64), 3.0), torch.full((2, 4, 64), 4.0))
    assert cache.keys[0][:2].eq(3).all() and cache.values[0][:2].eq(4).all()


def test_release_returns_one_requests_pages_and_keeps_the_others() -> None:
    cache = KVCache.allocate(8, 2048, 16, 4, 64, torch.float32, torch.device("cpu"))
    # Two requests' blocks interleaved, as a free list hands them out: even blocks and odd ones.
    finished = [b * 16 + i for b in range(0, 1024, 2) for i in range(16)]
    running = [b * 16 + i for b in range(1, 1024, 2) for i in range(16)]
    for layer in range(8):
        cache.write(layer, torch.tensor(finished), torch.ones(8192, 4, 64), torch.ones(8192, 4, 64))
        cache.write(layer, torch.tensor(running), torch.full((8192, 4, 64), 2.0),
                    torch.full((8192, 4, 64), 3.0))
    filled = _rss_bytes()
    cache.release(finished[:-5])  # the last block only partly: the page of its kept slots stays
    # Released: 8 layers x (K and V) x 511 blocks x 16 slots x 1 KiB = ~128 MiB.
    assert filled - _rss_bytes() > 100 * 2**20
    for layer in (0, 7):
        assert cache.keys[layer][finished[:-16]].eq(0).all()
        assert cache.values[layer][finished[:-16]].eq(0).all()
        assert cache.keys[layer][finished[-5:]].eq(1).all()  # never released
        assert cache.values[layer][finished[-8:]].eq(1).all()  # on the same page as those
        assert cache.keys[layer][running].eq(2).all() and cache.values[layer][running].eq(3).all()
    cache.write(0, torch.tensor(finished[:2]), torch.full((2, 4, 64), 5.0), torch.ones(2, 4, 64))
    assert cache.keys[0][finished[:2]].eq(5).all()
