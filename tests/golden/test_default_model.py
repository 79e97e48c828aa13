"""The packaged default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers, same file."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.golden.harness import Harness
from tests.golden.tiny_models import reference_greedy
from tgserve.launcher.weights import resolve_model

NEW_TOKENS = 64
PROMPTS = [
    "The capital of France is",
    "Écris une courte histoire sur un chat qui aime la pluie.",  # not English
    "def fibonacci(n):\n    ",
]


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):  # type: ignore[no-untyped-def]
    source = resolve_model(None, None, None, tmp_path_factory.mktemp("cache"))
    assert source.gguf_file is not None
    reference = AutoModelForCausalLM.from_pretrained(
        str(source.gguf_file.parent), gguf_file=source.gguf_file.name, dtype=torch.float32
    ).eval()
    harness = Harness(source.path, num_blocks=64, gguf_file=source.gguf_file)
    return harness, reference


def assert_greedy_matches(harness: Harness, reference, logprob_tolerance: float) -> None:  # type: ignore[no-untyped-def]
    tok = harness.tokenizer
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    # All three run together in one batch: batching must not change anyone's tokens.
    harness.add([harness.request(i, ids, NEW_TOKENS) for i, ids in enumerate(prompts)])
    harness.run_to_end()
    for i, ids in enumerate(prompts):
        expected, expected_lp = reference_greedy(reference, ids, NEW_TOKENS)
        got = harness.outputs[i]
        assert got.ids == expected, f"prompt {i} diverged"
        assert max(abs(a - b) for a, b in zip(got.logprobs, expected_lp)) < logprob_tolerance
        assert "".join(got.texts) == tok.decode(expected)


def test_greedy_64_tokens_identical_to_transformers(default_model) -> None:  # type: ignore[no-untyped-def]
    harness, reference = default_model
    assert_greedy_matches(harness, reference, 1e-3)


def test_float16_kv_cache_keeps_the_greedy_tokens(default_model) -> None:  # type: ignore[no-untyped-def]
    """`make bench` serves this model with --kv-cache-dtype float16 (as llama.cpp keeps its KV):
    on a real model's logits that rounding changes no greedy token."""
    harness, reference = default_model
    half = Harness(harness.model_dir, num_blocks=64, gguf_file=harness.gguf_file,
                   kv_dtype=torch.float16)
    assert_greedy_matches(half, reference, 1e-2)
