"""The fused C++ CPU operations against the torch compositions they replace, and their routing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.needs import needs_kernel
from tgserve.shard.kernels import CPU_OPS, TORCH_OPS, cpu_ops, fused
from tgserve.shard.kernels import greedy as greedy_kernel
from tgserve.shard.kernels.torch_ops import apply_rotary
from tgserve.shard.kv_cache import KVCache
from tgserve.shard.layers.linear import Linear, RowLinear
from tgserve.shard.layers.mlp import GatedMLP
from tgserve.shard.layers.norm import RMSNorm


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm, written out."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return weight * (x * torch.rsqrt(variance + eps))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 16, 67])
@pytest.mark.parametrize("hidden", [8, 576, 577])
def test_rms_norm_matches_reference(rows: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=gen) * 3
    weight = torch.randn(hidden, generator=gen)
    got = fused.rms_norm(x, weight, 1e-5)
    torch.testing.assert_close(got, torch_rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_rms_norm_reads_strided_rows() -> None:
    wide = torch.randn(5, 96)
    x = wide[:, 16:80]  # rows 96 apart, each unit-stride
    weight = torch.rand(64)
    torch.testing.assert_close(
        fused.rms_norm(x, weight, 1e-6), torch_rms_norm(x, weight, 1e-6)
    )


@needs_kernel
@pytest.mark.parametrize("rows", [1, 9, 64])
def test_add_rms_norm_returns_norm_of_sum_and_sum(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, residual = torch.randn(rows, 576, generator=gen), torch.randn(rows, 576, generator=gen)
    weight = torch.randn(576, generator=gen)
    normed, total = fused.add_rms_norm(x, residual, weight, 1e-5)
    torch.testing.assert_close(total, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(normed, torch_rms_norm(x + residual, weight, 1e-5))
    # The inputs are left as they were.
    assert not torch.equal(total, x) and not torch.equal(total, residual)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_silu_mul_matches_swiglu(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1536, generator=gen) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(gate_up), F.silu(gate) * up)


def _rotary_case(  # type: ignore[no-untyped-def]
    tokens: int, heads: int, kv_heads: int, dim: int, seed: int, dtype: torch.dtype = torch.float32
):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen)
    angles = torch.rand(tokens, dim // 2, generator=gen) * 100
    emb = torch.cat([angles, angles], dim=-1)
    cache = KVCache.allocate(1, 8, 16, kv_heads, dim, dtype, torch.device("cpu"))
    slots = torch.randperm(cache.num_slots, generator=gen)[:tokens]
    return qkv, emb.cos(), emb.sin(), cache, slots


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (4, 4, 8), (2, 1, 6)])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_rotary_store_kv_rotates_q_k_and_fills_the_slots(
    tokens: int, heads: int, kv_heads: int, dim: int
) -> None:
    qkv, cos, sin, cache, slots = _rotary_case(tokens, heads, kv_heads, dim, tokens + dim)
    q, k, v = qkv.clone().split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    want_q = apply_rotary(q.reshape(tokens, heads, dim), cos[:, None], sin[:, None])
    want_k = apply_rotary(k.reshape(tokens, kv_heads, dim), cos[:, None], sin[:, None])
    fused.rotary_store_kv(
        qkv, cos, sin, cache.keys[0], cache.values[0], slots, heads, kv_heads, dim
    )
    got_q, got_k, got_v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    torch.testing.assert_close(got_q.reshape(tokens, heads, dim), want_q)
    torch.testing.assert_close(got_k.reshape(tokens, kv_heads, dim), want_k)
    torch.testing.assert_close(got_v, v, rtol=0, atol=0)
    torch.testing.assert_close(cache.keys[0][slots], want_k)
    torch.testing.assert_close(cache.values[0][slots], v.reshape(tokens, kv_heads, dim))
    untouched = torch.ones(cache.num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert cache.keys[0][untouched].abs().sum() == 0 and cache.values[0][untouched].abs().sum() == 0


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (2, 1, 6)])
def test_rotary_store_kv_rounds_into_a_float16_cache_as_torch_does(
    heads: int, kv_heads: int, dim: int
) -> None:
    qkv, cos, sin, cache, slots = _rotary_case(19, heads, kv_heads, dim, dim, torch.float16)
    # Values beyond float16's range and below its normals round the way .half() rounds them;
    # the rotation itself is checked against apply_rotary above.
    qkv[0, :] *= 1e5
    qkv[1, :] *= 1e-6
    fused.rotary_store_kv(
        qkv, cos, sin, cache.keys[0], cache.values[0], slots, heads, kv_heads, dim
    )
    q_k_v = [heads * dim, kv_heads * dim, kv_heads * dim]
    _, k, v = qkv.split(q_k_v, dim=-1)  # rotated in place, in float32
    assert cache.keys[0].dtype == torch.float16
    torch.testing.assert_close(
        cache.keys[0][slots], k.reshape(-1, kv_heads, dim).half(), rtol=0, atol=0, equal_nan=True
    )
    torch.testing.assert_close(
        cache.values[0][slots], v.reshape(-1, kv_heads, dim).half(), rtol=0, atol=0
    )
    with pytest.raises(RuntimeError, match="both float32 or both float16"):
        fused.rotary_store_kv(
            qkv, cos, sin, cache.keys[0], cache.values[0].float(), slots, heads, kv_heads, dim
        )


@needs_kernel
def test_rotary_store_kv_refuses_a_slot_outside_the_cache() -> None:
    qkv, cos, sin, cache, slots = _rotary_case(3, 2, 1, 8, 0)
    slots[1] = cache.num_slots
    with pytest.raises(RuntimeError, match="outside"):
        fused.rotary_store_kv(qkv, cos, sin, cache.keys[0], cache.values[0], slots, 2, 1, 8)
    with pytest.raises(RuntimeError, match="width"):
        fused.rotary_store_kv(qkv, cos, sin, cache.keys[0], cache.values[0], slots, 3, 1, 8)


@needs_kernel
def test_both_ops_tables_give_the_same_rotated_q_k_v() -> None:
    """The C++ rotary_qkv writes the cache in the same pass; the torch one leaves that to the
    attention (kv_stored False): the same q, k, v either way, and the same rows once written."""
    qkv, cos, sin, cache, slots = _rotary_case(7, 9, 3, 64, 5)
    cos, sin = cos[:, None], sin[:, None]  # [T, 1, D], as RotaryEmbedding.cos_sin gives them
    args = (cache.keys[0], cache.values[0], slots, 9, 3, 64)
    want_q, want_k, want_v, stored = TORCH_OPS.rotary_qkv(qkv.clone(), cos, sin, *args)
    assert not stored and cache.keys[0].abs().sum() == 0
    q, k, v, stored = CPU_OPS.rotary_qkv(qkv, cos, sin, *args)
    assert stored
    assert q.shape == want_q.shape == (7, 9, 64) and k.shape == v.shape == (7, 3, 64)
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    torch.testing.assert_close(v, want_v, rtol=0, atol=0)
    torch.testing.assert_close(cache.keys[0][slots], want_k)
    torch.testing.assert_close(cache.values[0][slots], want_v, rtol=0, atol=0)
    # Another dtype goes to the torch twin, cache untouched.
    q64, _, _, stored = CPU_OPS.rotary_qkv(qkv.double(), cos.double(), sin.double(), *args)
    assert not stored and q64.dtype == torch.float64


@needs_kernel
def test_layers_route_float32_cpu_to_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("rms_norm", "add_rms_norm", "silu_mul"):
        real = getattr(fused, name)

        def spy(*args, _real=real, _name=name):  # type: ignore[no-untyped-def]
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(fused, name, spy)
    norm = RMSNorm(torch.rand(32), 1e-6, CPU_OPS)
    x, r = torch.randn(4, 32), torch.randn(4, 32)
    torch.testing.assert_close(norm(x), torch_rms_norm(x, norm.weight, 1e-6))
    normed, _ = norm.add(x, r)
    torch.testing.assert_close(normed, torch_rms_norm(x + r, norm.weight, 1e-6))
    mlp = GatedMLP(
        Linear(torch.randn(16, 32), kernels=CPU_OPS),
        RowLinear(Linear(torch.randn(32, 8), kernels=CPU_OPS), 1),
        F.silu,
        CPU_OPS,
    )
    gate, up = F.linear(x, mlp.gate_up.weight).chunk(2, dim=-1)
    torch.testing.assert_close(mlp(x), F.linear(F.silu(gate) * up, mlp.down.linear.weight))
    assert calls == ["rms_norm", "add_rms_norm", "silu_mul"]
    # Other dtypes take the torch path, which needs no kernel.
    calls.clear()
    norm64 = RMSNorm(torch.rand(32, dtype=torch.float64), 1e-6, CPU_OPS)
    norm64(x.double())
    norm64.add(x.double(), r.double())
    assert calls == []
    assert cpu_ops.fused is fused


def torch_greedy(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the chooser computed before the fused op: argmax, then log_softmax gathered there."""
    ids = scores.argmax(-1)
    return ids, torch.log_softmax(scores, -1).gather(1, ids[:, None]).squeeze(1)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 5, 64])
@pytest.mark.parametrize("vocab", [1, 7, 16, 33, 49152])
def test_greedy_choice_matches_argmax_and_log_softmax(rows: int, vocab: int) -> None:
    gen = torch.Generator().manual_seed(rows * vocab)
    scores = torch.randn(rows, vocab, generator=gen) * 8
    ids, logprobs = greedy_kernel.greedy_choice(scores)
    want_ids, want_logprobs = torch_greedy(scores)
    assert ids.dtype == torch.int64 and logprobs.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_greedy_choice_ties_nans_and_infinities_follow_torch() -> None:
    scores = torch.zeros(6, 40)
    scores[0, [3, 17, 35]] = 5.0  # ties in different SIMD lanes and in the tail: the first wins
    scores[1, [20, 4]] = 2.0
    scores[2, 9] = float("nan")
    scores[2, 30] = float("nan")
    scores[3, 0] = float("nan")
    scores[4, :] = float("-inf")
    scores[5, 12] = float("inf")
    ids, logprobs = greedy_kernel.greedy_choice(scores)
    want_ids, want_logprobs = torch_greedy(scores)
    assert ids.tolist() == want_ids.tolist() == [3, 4, 9, 0, 0, 12]
    torch.testing.assert_close(logprobs, want_logprobs, equal_nan=True)
    # A strided view (a column slice of wider logits) is read as it is.
    wide = torch.randn(4, 100)
    ids, logprobs = greedy_kernel.greedy_choice(wide[:, :60])
    torch.testing.assert_close(logprobs, torch_greedy(wide[:, :60])[1])
    assert torch.equal(ids, wide[:, :60].argmax(-1))


@needs_kernel
def test_greedy_chooser_takes_the_fused_op_and_keeps_all_logprobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tgserve.shard.sampling.chooser import NextTokenChooser
    from tgserve.shard.sampling.params import SamplingParams

    calls: list[tuple[int, ...]] = []
    kernel = greedy_kernel.greedy_choice

    def spy(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(tuple(scores.shape))
        return kernel(scores)

    monkeypatch.setattr(greedy_kernel, "greedy_choice", spy)
    assert cpu_ops.greedy_kernel is greedy_kernel
    logits = torch.randn(3, 50)
    out = NextTokenChooser.from_params(
        [SamplingParams()] * 3, [[1]] * 3, 50, "cpu", CPU_OPS
    )(logits)
    assert calls == [(3, 50)]
    want_ids, want_logprobs = torch_greedy(logits)
    assert torch.equal(out.next_ids, want_ids)
    torch.testing.assert_close(out.logprobs, want_logprobs)
    # The full distribution (top_n_tokens) is still there, made when asked for.
    torch.testing.assert_close(out.all_logprobs, torch.log_softmax(logits, -1))
    # A sampling row needs the distribution itself: no fused op.
    sampled = NextTokenChooser.from_params([SamplingParams(temperature=0.5, seed=3)], [[1]], 50,
                                           "cpu", CPU_OPS)
    sampled(torch.randn(1, 50))
    assert len(calls) == 1
