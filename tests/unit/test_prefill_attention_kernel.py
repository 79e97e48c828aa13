"""The C++ causal prefill-attention kernel against a float64 reference, and the ops' use of it."""

from __future__ import annotations

import pytest
import torch

from tests.needs import needs_kernel
from tgserve.shard.kernels import CPU_OPS, TORCH_OPS, attention, cpu_ops
from tgserve.shard.layers.attention.metadata import PrefillSequence


def reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, length: int, window: int
) -> torch.Tensor:
    """One sequence, in float64, with an explicit causal (and window) mask."""
    rows = slice(start, start + length)
    group = q.shape[1] // k.shape[1]
    qs = q[rows].double()
    ks = k[rows].double().repeat_interleave(group, dim=1)
    vs = v[rows].double().repeat_interleave(group, dim=1)
    scores = torch.einsum("ihd,jhd->hij", qs, ks) * q.shape[-1] ** -0.5
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    allowed = j <= i
    if window > 0:
        allowed &= j > i - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(dim=-1), vs).float()


def fused_qkv(
    gen: torch.Generator, tokens: int, heads: int, kv_heads: int, dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the model has them: strided views of one [T, (H + 2 Hkv) D] projection."""
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    return q, k, v


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 1, 64)]
)
@pytest.mark.parametrize("window", [0, 7])
def test_matches_reference(heads: int, kv_heads: int, dim: int, window: int) -> None:
    gen = torch.Generator().manual_seed(heads * 100 + dim + window)
    # Lengths around the 16-key panels and the 8-vector tiles, an empty sequence, gaps between.
    lengths = [1, 15, 16, 17, 0, 100, 301]
    starts, at = [], 2
    for n in lengths:
        starts.append(at)
        at += n + 1
    q, k, v = fused_qkv(gen, at, heads, kv_heads, dim)
    out = torch.full((at, heads, dim), 7.0)
    attention.prefill_attention(
        out, q, k, v, torch.tensor(starts), torch.tensor(lengths), dim**-0.5, window
    )
    inside = torch.zeros(at, dtype=torch.bool)
    for start, n in zip(starts, lengths, strict=True):
        inside[start : start + n] = True
        if n:
            expected = reference(q, k, v, start, n, window)
            torch.testing.assert_close(out[start : start + n], expected, atol=2e-5, rtol=1e-4)
    assert (out[~inside] == 7.0).all()  # rows of no sequence are left alone


@needs_kernel
def test_rejects_what_it_cannot_do() -> None:
    q, k, v = fused_qkv(torch.Generator().manual_seed(0), 10, 2, 1, 64)
    out = torch.empty(10, 2, 64)
    with pytest.raises(RuntimeError, match="outside the rows"):
        attention.prefill_attention(out, q, k, v, torch.tensor([5]), torch.tensor([6]), 0.1)
    max_length, multiple = attention.prefill_attention_limits()
    bad_dim = multiple + multiple // 2
    q, k, v = fused_qkv(torch.Generator().manual_seed(0), 10, 2, 1, bad_dim)
    with pytest.raises(RuntimeError, match="head dim"):
        attention.prefill_attention(
            torch.empty(10, 2, bad_dim), q, k, v, torch.tensor([0]), torch.tensor([10]), 0.1
        )
    assert max_length >= 2048


class _Cache:
    """The two per-layer tensors the prefill reads for a cached prefix."""

    def __init__(self, slots: int, kv_heads: int, dim: int, gen: torch.Generator) -> None:
        self.keys = [torch.randn(slots, kv_heads, dim, generator=gen)]
        self.values = [torch.randn(slots, kv_heads, dim, generator=gen)]


@needs_kernel
def test_cpu_ops_send_new_prompts_to_the_kernel_and_cached_ones_to_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gen = torch.Generator().manual_seed(3)
    heads, kv_heads, dim = 6, 2, 64
    q, k, v = fused_qkv(gen, 60, heads, kv_heads, dim)
    cache = _Cache(200, kv_heads, dim, gen)
    cached_slots = torch.arange(100, 130)  # 10 cached positions, then this prompt's 20 new ones
    cache.keys[0][cached_slots[10:]] = k[40:60]
    cache.values[0][cached_slots[10:]] = v[40:60]
    sequences = [
        PrefillSequence(start=0, length=25, cache_len=0, kv_slots=None),
        PrefillSequence(start=25, length=15, cache_len=0, kv_slots=None),
        PrefillSequence(start=40, length=20, cache_len=10, kv_slots=cached_slots),
    ]
    calls: list[list[int]] = []
    kernel = attention.prefill_attention

    def spy(out, q, k, v, starts, lengths, scale, window=0):  # type: ignore[no-untyped-def]
        calls.append(starts.tolist())
        kernel(out, q, k, v, starts, lengths, scale, window)

    monkeypatch.setattr(attention, "prefill_attention", spy)
    assert cpu_ops.attention is attention  # the module the C++ ops call through
    out = torch.zeros(60, heads, dim)
    CPU_OPS.prefill_attention(
        out, q, k, v, cache.keys[0], cache.values[0], sequences, dim**-0.5, None
    )
    assert calls == [[0, 25]]  # both new prompts in one call; the cached one went to torch

    torch_path = torch.zeros(60, heads, dim)
    TORCH_OPS.prefill_attention(
        torch_path, q, k, v, cache.keys[0], cache.values[0], sequences, dim**-0.5, None
    )
    assert calls == [[0, 25]]
    torch.testing.assert_close(out, torch_path, atol=2e-5, rtol=1e-4)
