"""The small per-family options of the shared layers (Gemma's norm, activation; the registry)."""

from __future__ import annotations

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig, Qwen3Config
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

from tgserve.shard.kernels import CPU_OPS, TORCH_OPS, KernelOps
from tgserve.shard.layers.norm import load_rms_norm
from tgserve.shard.loading.weights import Weights
from tgserve.shard.models.gemma import GemmaForCausalLM, activation_name
from tgserve.shard.models.qwen3 import Qwen3ForCausalLM
from tgserve.shard.models.registry import UnsupportedModelError, model_class

OPS = [TORCH_OPS, CPU_OPS]


def ops_ready(ops: KernelOps, request: pytest.FixtureRequest) -> KernelOps:
    """The C++ ops need their kernels built (tests/conftest.py's built_kernels skips without)."""
    if ops is CPU_OPS:
        request.getfixturevalue("built_kernels")
    return ops


def gemma_norm(dtype: torch.dtype, hidden: int = 48) -> tuple[GemmaRMSNorm, torch.Tensor]:
    torch.manual_seed(0)
    reference = GemmaRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        reference.weight.normal_(0.0, 0.5)
    reference = reference.to(dtype)
    return reference, torch.randn(5, hidden).to(dtype) * 3


@pytest.mark.parametrize("ops", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_offset_norm_matches_gemma_in_half_precision(
    ops: KernelOps, dtype: torch.dtype, request: pytest.FixtureRequest
) -> None:
    """Gemma rounds (normed · (1 + w)) once, in float32 until then; rounding the normed input to
    the half dtype first, as Llama's norm does, gives other values."""
    reference, x = gemma_norm(dtype)
    weights = Weights({"n.weight": reference.weight.detach()}, dtype, torch.device("cpu"))
    norm = load_rms_norm(weights, "n", 1e-6, ops_ready(ops, request), offset=1.0)
    assert norm.weight.dtype == torch.float32
    with torch.no_grad():
        expected = reference(x)
        got = norm(x)
        assert got.dtype == dtype
        assert torch.equal(got, expected)
        residual = torch.randn_like(x)
        normed, total = norm.add(x, residual)
        assert torch.equal(total, x + residual)
        assert torch.equal(normed, reference(x + residual))


@pytest.mark.parametrize("ops", OPS, ids=lambda o: o.name)
def test_offset_norm_matches_gemma_in_float32(
    ops: KernelOps, request: pytest.FixtureRequest
) -> None:
    reference, x = gemma_norm(torch.float32)
    weights = Weights({"n.weight": reference.weight.detach()}, torch.float32, torch.device("cpu"))
    norm = load_rms_norm(weights, "n", 1e-6, ops_ready(ops, request), offset=1.0)
    with torch.no_grad():
        assert torch.allclose(norm(x), reference(x), atol=1e-6, rtol=1e-6)


def test_gemma_activation_is_the_tanh_gelu() -> None:
    """Released configs say "gelu" and mean the tanh approximation; older ones name it in
    hidden_activation, which wins when set."""
    assert activation_name(GemmaConfig()) == "gelu_pytorch_tanh"
    legacy = GemmaConfig()
    legacy.hidden_act = "gelu"
    assert activation_name(legacy) == "gelu_pytorch_tanh"
    explicit = GemmaConfig()
    explicit.hidden_activation = "gelu_new"
    assert activation_name(explicit) == "gelu_new"


def test_registry_serves_qwen3_and_gemma_and_names_them_when_refusing() -> None:
    assert model_class(Qwen3Config()) is Qwen3ForCausalLM
    assert model_class(GemmaConfig()) is GemmaForCausalLM
    other = LlamaConfig()
    other.model_type = "not-a-model"
    with pytest.raises(UnsupportedModelError, match="gemma.*qwen3"):
        model_class(other)
