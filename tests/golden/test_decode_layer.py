"""The one-op decode layer (decode_layer.cpp) equals the layer's Python composition, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.golden.harness import Harness, count_calls
from tests.golden.tiny_models import build
from tests.needs import needs_kernel
from tgserve.shard.kernels import decode_layer
from tgserve.shard.models.llama import LlamaForCausalLM


def decode_run(folder: Path, fused: bool, prompts: list[list[int]]) -> Harness:
    h = Harness(folder, num_blocks=64)
    model = h.generator.model
    assert isinstance(model, LlamaForCausalLM)
    assert all(layer.fused_decode for layer in model.layers)
    for layer in model.layers:  # every piece packed on CPU
        linears = (layer.attention.qkv, layer.attention.o.linear, layer.mlp.gate_up,
                   layer.mlp.down.linear)
        assert all(linear.packed is not None for linear in linears)
    for layer in model.layers:
        layer.fused_decode = fused
    h.add([h.request(i, p, 12) for i, p in enumerate(prompts[:2])])
    for _ in range(3):
        h.step()
    h.add([h.request(2, prompts[2], 12)], mixed=True)  # a mixed step takes the Python path
    h.run_to_end()
    return h


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_fused_decode_layer_is_bit_identical(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build(arch, tmp_path)
    g = torch.Generator().manual_seed(7)
    # Mistral's window is 24: the 30-token prompt decodes past it.
    prompts = [torch.randint(1, 500, (n,), generator=g).tolist() for n in (30, 5, 17)]
    calls = count_calls(monkeypatch, decode_layer, "llama_decode_layer")
    fused = decode_run(tmp_path, True, prompts)
    assert calls[0] > 0
    seen = calls[0]
    plain = decode_run(tmp_path, False, prompts)
    assert calls[0] == seen  # the switch really turns it off
    for rid in range(3):
        assert fused.outputs[rid].ids == plain.outputs[rid].ids
        assert fused.outputs[rid].logprobs == plain.outputs[rid].logprobs  # exactly
