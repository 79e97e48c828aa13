"""The C++ paged decode-attention kernel against a naive per-row softmax reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.needs import needs_kernel
from tgserve.shard.kernels import attention, build
from tgserve.shard.layers.attention.metadata import AttentionMetadata


def reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    """One row at a time, in float64, with plain advanced indexing: slow but obviously right."""
    batch, heads, _ = q.shape
    group = heads // k_cache.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        n = int(lengths[b])
        begin = max(0, n - window) if window > 0 else 0
        if n == 0:
            continue
        slots = kv_index[b, begin:n]
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v)
    return out.float()


def random_case(
    gen: torch.Generator, batch: int, kv_heads: int, group: int, dim: int, num_slots: int = 4096
) -> tuple[torch.Tensor, ...]:
    heads = kv_heads * group
    q = torch.randn(batch, heads, dim, generator=gen)
    k_cache = torch.randn(num_slots, kv_heads, dim, generator=gen)
    v_cache = torch.randn(num_slots, kv_heads, dim, generator=gen)
    lengths = torch.randint(1, 300, (batch,), generator=gen)
    lengths[0] = 1  # a row with a single position
    max_len = int(lengths.max()) + 3  # right padding beyond every row
    # Scattered, non-contiguous slots: a random permutation slice per row, never sorted.
    kv_index = torch.stack(
        [torch.randperm(num_slots, generator=gen)[:max_len] for _ in range(batch)]
    )
    return q, k_cache, v_cache, kv_index, lengths


@needs_kernel
# 20 and 80 are not multiples of the kernel's widest tile (64 floats with AVX-512, 16 with AVX2) and
# 20 not of a vector: they exercise its remainder loops.
@pytest.mark.parametrize("dim", [16, 20, 64, 80, 128])
@pytest.mark.parametrize("window", [0, 7])
def test_matches_reference_over_random_shapes(dim: int, window: int) -> None:
    gen = torch.Generator().manual_seed(dim * 10 + window)
    # Few rows split each row's kv heads over tasks; many rows give each task a whole row. The
    # kernel takes a kv head's query heads three at a time: groups of 4-8 leave it a remainder.
    groups = (1, 2, 3, 4, 5, 7, 8, 6)
    for trial, batch in enumerate((1, 2, 3, 5, 8, 13, 21, 40)):
        kv_heads = 1 + trial % 4
        group = groups[trial]
        case = random_case(gen, batch, kv_heads, group, dim)
        scale = dim**-0.5
        got = attention.paged_decode_attention(*case, scale, window)
        want = reference(*case, scale, window)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dim", [20, 64])
def test_float16_cache_is_read_as_its_float_values(dim: int) -> None:
    """A float16 cache gives what the float32 kernel gives on the same rounded values (only
    storage is half; the arithmetic is the same float32), in every task layout. Bit for bit where
    head_dim is whole vectors; the scalar tail of dim 20 may contract into FMAs differently."""
    gen = torch.Generator().manual_seed(dim)
    for trial, batch in enumerate((1, 3, 13, 40)):
        q, k_cache, v_cache, kv_index, lengths = random_case(gen, batch, 1 + trial, 3, dim)
        k16, v16 = k_cache.half(), v_cache.half()
        for window in (0, 7):
            got = attention.paged_decode_attention(q, k16, v16, kv_index, lengths, 0.1, window)
            want = attention.paged_decode_attention(
                q, k16.float(), v16.float(), kv_index, lengths, 0.1, window
            )
            tol = 0.0 if dim % 16 == 0 else 1e-6
            torch.testing.assert_close(got, want, rtol=10 * tol, atol=tol)
            torch.testing.assert_close(
                got, reference(q, k16.float(), v16.float(), kv_index, lengths, 0.1, window),
                atol=1e-5, rtol=1e-5,
            )  # fmt: skip


@needs_kernel
def test_large_head_dim_and_padding_slots_are_ignored() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k_cache, v_cache, kv_index, lengths = random_case(gen, 4, 2, 4, 256)
    got = attention.paged_decode_attention(q, k_cache, v_cache, kv_index, lengths, 0.0625, 0)
    # Poison every slot that no row attends: a kernel reading the padding would change its output.
    used = torch.zeros(k_cache.shape[0], dtype=torch.bool)
    for b in range(4):
        used[kv_index[b, : lengths[b]]] = True
    k_cache[~used] = float("nan")
    v_cache[~used] = float("nan")
    again = attention.paged_decode_attention(q, k_cache, v_cache, kv_index, lengths, 0.0625, 0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)
    want = reference(q, k_cache, v_cache, kv_index, lengths, 0.0625, 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_large_scores_stay_finite() -> None:
    """Scores in the thousands overflow exp() unless the softmax subtracts a running max."""
    gen = torch.Generator().manual_seed(2)
    q, k_cache, v_cache, kv_index, lengths = random_case(gen, 3, 2, 2, 64)
    q = q * 100
    got = attention.paged_decode_attention(q, k_cache, v_cache, kv_index, lengths, 1.0, 0)
    assert torch.isfinite(got).all()
    want = reference(q, k_cache, v_cache, kv_index, lengths, 1.0, 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_strided_views_are_read_in_place() -> None:
    """A view of a bigger cache tensor, and a slice of a wider slot table, work uncopied."""
    gen = torch.Generator().manual_seed(3)
    q, k_cache, v_cache, kv_index, lengths = random_case(gen, 2, 2, 3, 32, num_slots=512)
    k_wide = torch.cat([k_cache, torch.randn_like(k_cache)], dim=2)[..., :32]
    v_wide = torch.cat([v_cache, torch.randn_like(v_cache)], dim=2)[..., :32]
    # The runner passes a column slice of its wider slot table.
    table = torch.cat([kv_index, torch.full_like(kv_index, -1)], dim=1)[:, : kv_index.shape[1]]
    assert not k_wide.is_contiguous() and not table.is_contiguous()
    got = attention.paged_decode_attention(q, k_wide, v_wide, table, lengths, 0.2, 0)
    want = reference(q, k_cache, v_cache, kv_index, lengths, 0.2, 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_matches_masked_sdpa_over_gathered_context() -> None:
    """Same answer as gathering each row's context and running masked SDPA (the path it replaces),
    written out here rather than imported, so it stays a torch-only reference whatever the torch
    ops do."""
    gen = torch.Generator().manual_seed(4)
    q, k_cache, v_cache, kv_index, lengths = random_case(gen, 5, 3, 3, 64)
    meta = AttentionMetadata(
        slots=torch.zeros(5, dtype=torch.long),
        positions=torch.zeros(5, dtype=torch.long),
        kv_index=kv_index,
        kv_lengths=lengths,
    )
    keys = k_cache[kv_index].transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache[kv_index].transpose(1, 2)
    for window in (None, 20):
        mask = meta.decode_mask(window)
        want = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask, scale=0.125, enable_gqa=True
        ).squeeze(2)
        got = attention.paged_decode_attention(
            q, k_cache, v_cache, kv_index, lengths, 0.125, window or 0
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_empty_row_gives_zeros() -> None:
    gen = torch.Generator().manual_seed(5)
    q, k_cache, v_cache, kv_index, lengths = random_case(gen, 2, 1, 2, 16)
    lengths[1] = 0
    got = attention.paged_decode_attention(q, k_cache, v_cache, kv_index, lengths, 0.25, 0)
    assert torch.equal(got[1], torch.zeros_like(got[1]))


@needs_kernel
def test_rejects_bad_inputs() -> None:
    gen = torch.Generator().manual_seed(6)
    q, k_cache, v_cache, kv_index, lengths = random_case(gen, 2, 2, 2, 16, num_slots=64)
    bad_index = kv_index.clone()
    bad_index[1, 0] = 64  # one past the last slot
    with pytest.raises(RuntimeError, match="slot outside"):
        attention.paged_decode_attention(q, k_cache, v_cache, bad_index, lengths, 0.25, 0)
    with pytest.raises(RuntimeError, match="lengths"):
        too_long = lengths.clone()
        too_long[0] = kv_index.shape[1] + 1
        attention.paged_decode_attention(q, k_cache, v_cache, kv_index, too_long, 0.25, 0)
    with pytest.raises(RuntimeError, match="float32"):
        attention.paged_decode_attention(
            q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), kv_index, lengths, 0.25, 0
        )
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        attention.paged_decode_attention(q[:, :3], k_cache, v_cache, kv_index, lengths, 0.25, 0)


def test_compile_flags_are_portable() -> None:
    assert "-march=native" not in build.compile_flags("AVX512")
    assert "-mavx2" in build.compile_flags("AVX2")
    assert "-mavx2" not in build.compile_flags("DEFAULT")
    # AMX code only where the CPU has tiles: a binary built for AVX-512 alone must not carry it.
    assert "-mamx-tile" in build.compile_flags("AVX512_AMX")
    assert "-mavx512f" in build.compile_flags("AVX512_AMX")
    assert "-mamx-tile" not in build.compile_flags("AVX512")


def test_an_amx_build_that_fails_falls_back_to_avx512(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[list[str]] = []

    def fake_build(cpp_extension, directory, flags):  # type: ignore[no-untyped-def]
        built.append(flags)
        if "-mamx-tile" in flags:
            raise RuntimeError("cc1plus: error: unrecognized command-line option '-mamx-tile'")

    monkeypatch.setattr(build, "_build", fake_build)
    ops, capability = build.build_with_fallback(None, "AVX512_AMX")
    assert capability == "AVX512" and ops is not None
    assert "-mamx-tile" in built[0] and "-mamx-tile" not in built[1] and "-mavx512f" in built[1]
    # Any other failure is final: the torch path.
    monkeypatch.setattr(build, "_build", lambda *a: (_ for _ in ()).throw(OSError("no cc")))
    assert build.build_with_fallback(None, "AVX2") == (None, "AVX2")
