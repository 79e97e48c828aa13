"""The packed C++ linear kernel against F.linear, and the layers that hold packed weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.needs import needs_kernel
from tgserve.shard.kernels import CPU_OPS, build, select_ops
from tgserve.shard.kernels import linear as kernel_linear
from tgserve.shard.layers.embedding import Embedding, LMHead
from tgserve.shard.layers.linear import Linear


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """In float64, so the comparison measures the kernel's rounding, not the reference's."""
    b = None if bias is None else bias.double()
    return F.linear(x.double(), weight.double(), b).float()


def assert_matches(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None):
    want = reference(x, w, b)
    # Relative to the row's scale: a dot product of K terms rounds in proportion to its magnitude.
    scale = x.abs().amax().item() * w.abs().amax().item() * x.shape[-1] ** 0.5
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * max(scale, 1.0))
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=2e-6 * max(scale, 1.0))


def packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    panels = kernel_linear.pack_linear_weight(weight)
    return kernel_linear.packed_linear(x, panels, weight.shape[0], bias)


@needs_kernel
@pytest.mark.parametrize("k", [1, 13, 64, 576, 1000, 1536])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_f_linear_for_every_batch_size(k: int, with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(k * 2 + with_bias)
    width = kernel_linear.linear_panel_width()
    # N: below one panel, one panel, not a multiple of the panel, and the decode shapes.
    for n in (1, 7, width, width + 3, 130, 960, 3072):
        weight = torch.randn(n, k, generator=gen)
        bias = torch.randn(n, generator=gen) if with_bias else None
        packed_weight = kernel_linear.pack_linear_weight(weight)
        # Every tile height of the micro-kernel (1 to 28 rows, each as a single tile), two and
        # three tiles, decode batches, and prefill sizes past one 192-row chunk of x.
        for m in (*range(1, 30), 57, 64, 191, 192, 193, 400):
            x = torch.randn(m, k, generator=gen)
            got = kernel_linear.packed_linear(x, packed_weight, n, bias)
            assert got.shape == (m, n)
            assert_matches(got, x, weight, bias)


@needs_kernel
def test_amx_takes_the_larger_batches_where_the_cpu_has_tiles() -> None:
    # Built for what the CPU has (GCC 11 and newer know AMX; an older one falls back to AVX-512).
    assert build.built_capability() == build.cpu_capability()
    has_amx = build.built_capability() == "AVX512_AMX"
    min_rows = kernel_linear.linear_amx_min_rows()
    assert (min_rows > 0) == has_amx
    if not has_amx:
        return  # no tiles on this CPU: the AVX path above is the only one
    # Both sides of the switch, rows that are not a multiple of the 32-row block, K past one
    # 1 MiB chunk of x's pieces (several chunks at 1536), N with an odd panel count, and a bias:
    # float32 accuracy, as the AVX kernel's (assert_matches).
    gen = torch.Generator().manual_seed(7)
    for k, n in ((576, 960), (1536, 576), (70, 100), (33, 17)):
        weight, bias = torch.randn(n, k, generator=gen), torch.randn(n, generator=gen)
        panels = kernel_linear.pack_linear_weight(weight)
        for m in (min_rows - 1, min_rows, min_rows + 5, 3 * min_rows + 17):
            x = torch.randn(m, k, generator=gen)
            assert_matches(kernel_linear.packed_linear(x, panels, n, bias), x, weight, bias)
            assert_matches(kernel_linear.packed_linear(x, panels, n, None), x, weight, None)
    # Inputs past bfloat16's range of exact pieces still come out right: a float32 is the sum
    # of its three bfloat16 pieces whatever its exponent.
    weight = torch.randn(64, 576, generator=gen) * 1e-3
    x = torch.randn(min_rows, 576, generator=gen) * 1e4
    assert_matches(packed(x, weight, None), x, weight, None)


@needs_kernel
def test_pack_layout_is_panels_of_transposed_rows() -> None:
    width = kernel_linear.linear_panel_width()
    weight = torch.arange((3 * width - 2) * 5, dtype=torch.float32).view(3 * width - 2, 5)
    panels = kernel_linear.pack_linear_weight(weight)
    assert panels.shape == (3, 5, width)
    for n in range(weight.shape[0]):
        assert torch.equal(panels[n // width, :, n % width], weight[n])
    assert panels[2, :, width - 2 :].abs().sum() == 0  # padding past N is zero


@needs_kernel
def test_non_contiguous_x_is_read_correctly() -> None:
    gen = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(300, 200, generator=gen), torch.randn(300, generator=gen)
    wide = torch.randn(5, 400, generator=gen)
    for x in (wide[:, ::2], wide[:, 100:300], torch.randn(200, 5, generator=gen).t()):
        assert not x.is_contiguous()
        assert_matches(packed(x, weight, bias), x, weight, bias)


@needs_kernel
def test_each_panel_writes_only_its_own_outputs() -> None:
    # One-hot weight rows pick single input columns: a panel that wrote a neighbour's output, or a
    # thread that covered the wrong range of panels, gives a wrong column at once.
    k, n = 96, 1027
    weight = torch.zeros(n, k)
    weight[torch.arange(n), torch.arange(n) % k] = 1.0
    for m in (1, 6, 23, 200):
        x = torch.randn(m, k)
        assert torch.equal(packed(x, weight, None), x[:, torch.arange(n) % k])


@needs_kernel
def test_packed_rows_read_back_the_original_rows() -> None:
    weight = torch.randn(1000, 72)
    panels = kernel_linear.pack_linear_weight(weight)
    ids = torch.tensor([0, 1, 31, 32, 33, 500, 999, 1])
    assert torch.equal(kernel_linear.packed_rows(ids, panels, 1000), weight[ids])
    with pytest.raises(RuntimeError, match="out of range"):
        kernel_linear.packed_rows(torch.tensor([1000]), panels, 1000)


@needs_kernel
def test_rejects_what_it_cannot_multiply() -> None:
    weight = torch.randn(32, 64)
    panels = kernel_linear.pack_linear_weight(weight)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="K"):
        kernel_linear.packed_linear(torch.randn(2, 63), panels, 32, None)
    with pytest.raises(RuntimeError, match="n disagrees"):
        kernel_linear.packed_linear(x, panels, 32 + kernel_linear.linear_panel_width(), None)
    with pytest.raises(RuntimeError, match="float32"):
        kernel_linear.packed_linear(x.double(), panels, 32, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernel_linear.packed_linear(x, panels, 32, torch.randn(31))
    with pytest.raises(RuntimeError, match="pack_linear_weight"):
        kernel_linear.packed_linear(x, weight, 32, None)


@needs_kernel
def test_layers_hold_float32_cpu_weights_packed_once() -> None:
    weight, bias = torch.randn(130, 40), torch.randn(130)
    layer = Linear.of(weight, bias, CPU_OPS)
    assert layer.weight is None and layer.packed is not None  # the plain copy is not kept
    x = torch.randn(2, 3, 40)  # a leading batch dimension
    out = layer(x)
    assert out.shape == (2, 3, 130)
    assert_matches(out.reshape(6, 130), x.reshape(6, 40), weight, bias)
    for rows in (1, 64, 300):  # decode and prefill go through the same weight
        batch = torch.randn(rows, 40)
        assert_matches(layer(batch), batch, weight, bias)


@needs_kernel
def test_a_tied_embedding_reads_the_lm_heads_panels() -> None:
    table = torch.randn(200, 40)
    embedding = Embedding(table, 0, 1)
    head = LMHead(Linear.of(table, None, CPU_OPS), 1)
    embedding.weight, embedding.tied = None, head.linear
    ids = torch.tensor([[3, 199], [0, 64]])
    assert torch.equal(embedding(ids), table[ids])
    hidden = torch.randn(5, 40)
    assert_matches(head(hidden), hidden, table, None)


def test_other_weights_stay_plain_for_torch() -> None:
    for weight in (
        torch.randn(130, 40).double(),  # not float32
        torch.randn(4, 8),  # too small to be worth packing
        torch.randn(130, 40, requires_grad=True),  # autograd needs the torch path
    ):
        layer = Linear.of(weight, None, CPU_OPS)
        assert layer.packed is None and layer.weight is weight
        x = torch.randn(3, 40 if weight.shape[1] == 40 else 8, dtype=weight.dtype)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), F.linear(x, weight))
    # A float32 CPU weight is packed where the kernels built (the C++ ops are chosen), else not.
    panels = select_ops("cpu").pack_linear(torch.randn(130, 40), None)
    assert (panels is not None) == build.available()
