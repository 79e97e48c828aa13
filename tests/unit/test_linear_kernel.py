"""The C++ small-batch linear kernel against F.linear, and the layer routing that chooses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgserve.shard.layers import linear as linear_module
from tgserve.shard.layers.attention import cpu_kernels
from tgserve.shard.layers.embedding import LMHead
from tgserve.shard.layers.linear import Linear, linear

needs_kernel = pytest.mark.skipif(
    not cpu_kernels.available(),
    reason="C++ CPU kernels could not be built here (no ninja or no C++ compiler)",
)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """In float64, so the comparison measures the kernel's rounding, not the reference's."""
    b = None if bias is None else bias.double()
    return F.linear(x.double(), weight.double(), b).float()


def assert_matches(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    want = reference(x, w, b)
    # Relative to the row's scale: a dot product of K terms rounds in proportion to its magnitude.
    scale = x.abs().amax().item() * w.abs().amax().item() * x.shape[-1] ** 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(scale, 1.0))
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-6 * max(scale, 1.0))


@needs_kernel
# K: multiples of the 16-float main loop, of the 8-float step only, and neither (tails of 1..15).
@pytest.mark.parametrize("k", [64, 72, 576, 577, 1000, 1531, 1536])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear_for_every_batch_size(k: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(k * 2 + with_bias)
    # N: below one row block, not a multiple of any block size, and the decode shapes.
    for n in (1, 3, 7, 130, 960, 3072):
        weight = torch.randn(n, k, generator=gen)
        bias = torch.randn(n, generator=gen) if with_bias else None
        # 1-8: one row block for all rows; 9-64: register tiles of up to 6 rows (tails of 1-5).
        for m in (*range(1, 9), 9, 12, 13, 16, 17, 31, 32, 59, 64):
            x = torch.randn(m, k, generator=gen)
            got = cpu_kernels.small_batch_linear(x, weight, bias)
            assert got.shape == (m, n)
            assert_matches(got, x, weight, bias)


@needs_kernel
def test_small_k_and_k_shorter_than_one_vector() -> None:
    gen = torch.Generator().manual_seed(3)
    for k in (1, 5, 8, 13, 16):
        weight, bias = torch.randn(37, k, generator=gen), torch.randn(37, generator=gen)
        x = torch.randn(3, k, generator=gen)
        assert_matches(cpu_kernels.small_batch_linear(x, weight, bias), x, weight, bias)


@needs_kernel
def test_non_contiguous_x_is_read_correctly() -> None:
    gen = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(300, 200, generator=gen), torch.randn(300, generator=gen)
    wide = torch.randn(5, 400, generator=gen)
    for x in (wide[:, ::2], wide[:, 100:300], torch.randn(200, 5, generator=gen).t()):
        assert not x.is_contiguous()
        assert_matches(cpu_kernels.small_batch_linear(x, weight, bias), x, weight, bias)


@needs_kernel
def test_each_row_block_writes_only_its_own_outputs() -> None:
    # One-hot weight rows pick single input columns: a block that wrote a neighbour's output, or a
    # thread that covered the wrong range of W, gives a wrong column at once.
    k, n = 96, 1027
    weight = torch.zeros(n, k)
    weight[torch.arange(n), torch.arange(n) % k] = 1.0
    for m in (6, 23):  # the row-block path and the tiled path
        x = torch.randn(m, k)
        got = cpu_kernels.small_batch_linear(x, weight, None)
        assert torch.equal(got, x[:, torch.arange(n) % k])


@needs_kernel
def test_rejects_what_it_cannot_stream() -> None:
    x, weight = torch.randn(2, 64), torch.randn(32, 64)
    with pytest.raises(RuntimeError, match="contiguous"):
        cpu_kernels.small_batch_linear(x, torch.randn(64, 32).t(), None)
    with pytest.raises(RuntimeError, match="rows"):
        cpu_kernels.small_batch_linear(torch.randn(65, 64), weight, None)
    with pytest.raises(RuntimeError, match="K"):
        cpu_kernels.small_batch_linear(torch.randn(2, 63), weight, None)
    with pytest.raises(RuntimeError, match="float32"):
        cpu_kernels.small_batch_linear(x.double(), weight.double(), None)
    with pytest.raises(RuntimeError, match="bias"):
        cpu_kernels.small_batch_linear(x, weight, torch.randn(31))


def spy_kernel(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Records the x shape of every call that reaches the kernel, still computing the result."""
    calls: list[tuple[int, ...]] = []
    real = cpu_kernels.small_batch_linear

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(linear_module.cpu_kernels, "small_batch_linear", spy)
    return calls


@needs_kernel
def test_layers_route_decode_sized_inputs_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_kernel(monkeypatch)
    layer = Linear(torch.randn(48, 40), torch.randn(48))
    head = LMHead(torch.randn(100, 40), world_size=1)
    x = torch.randn(2, 3, 40)  # 6 rows in all, with a leading batch dimension
    batch = torch.randn(64, 40)  # a decode batch of 64
    with torch.inference_mode():
        out, logits = layer(x), head(x[0])
        layer(batch)
    assert calls == [(6, 40), (3, 40), (64, 40)]
    assert out.shape == (2, 3, 48) and logits.shape == (3, 100)
    assert_matches(out.reshape(6, 48), x.reshape(6, 40), layer.weight, layer.bias)
    assert_matches(logits, x[0], head.weight, None)


@needs_kernel
def test_layers_fall_back_where_the_kernel_does_not_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = spy_kernel(monkeypatch)
    weight = torch.randn(48, 40)
    cases = [
        (torch.randn(65, 40), weight),  # prefill-sized: a GEMM, torch's own is better there
        (torch.randn(2, 40).double(), weight.double()),
        (torch.randn(2, 40), torch.randn(40, 48).t()),  # non-contiguous weight
        (torch.randn(0, 40), weight),
    ]
    with torch.inference_mode():
        for x, w in cases:
            torch.testing.assert_close(linear(x, w), F.linear(x, w))
    x = torch.randn(2, 40, requires_grad=True)
    linear(x, weight).sum().backward()  # autograd needs the torch path
    assert x.grad is not None
    assert calls == []
