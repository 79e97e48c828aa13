"""A 16-bit KV cache (--kv-cache-dtype float16 or bfloat16) against transformers in float32.

Only the stored K and V are rounded (float16: to 11 significant bits); every product and sum stays
float32. On these tiny random models float16 moves log-probabilities by up to ~7e-3, enough to
flip a near-tie, so each generated token is checked against transformers run over the same tokens
(teacher forcing): it must be transformers' argmax or within KV_LOGPROB_TOLERANCE of it, and its
log-probability within KV_LOGPROB_TOLERANCE of transformers'. The packaged default model, whose
logits are not near ties, gets its greedy tokens compared one for one (test_default_model.py).
Llama-shaped models read a float16 cache through the C++ kernels, GPT-2 through the torch path.
"""

from __future__ import annotations

import pytest
import torch

from tests.golden.harness import Harness, count_calls
from tests.golden.tiny_models import ARCHS, build
from tests.needs import needs_kernel
from tgserve.shard.kernels import decode_layer

NEW_TOKENS = 48
KV_LOGPROB_TOLERANCE = 2e-2
# bfloat16 keeps 8 significant bits, 3 fewer than float16: measured up to ~3e-2 here.
TOLERANCE = {torch.float16: KV_LOGPROB_TOLERANCE, torch.bfloat16: 4 * KV_LOGPROB_TOLERANCE}


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp(request.param)
    return request.param, folder, build(request.param, folder)


def prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (length,), generator=g).tolist()


def assert_close_to_reference(  # type: ignore[no-untyped-def]
    reference, h: Harness, rid: int, ids: list[int], tol: float = KV_LOGPROB_TOLERANCE
) -> None:
    out = h.outputs[rid]
    assert out.ids, f"request {rid} generated nothing"
    with torch.no_grad():
        logits = reference(torch.tensor([ids + out.ids])).logits[0].float()
    ref = torch.log_softmax(logits[len(ids) - 1 : -1], dim=-1)  # the step that chose each token
    for t, (token, logprob) in enumerate(zip(out.ids, out.logprobs)):
        best = ref[t].max().item()
        assert ref[t, token].item() >= best - tol, f"request {rid}, token {t}"
        assert abs(logprob - ref[t, token].item()) < tol, f"request {rid}, token {t}"


@pytest.mark.parametrize("mixed", [False, True], ids=["separate-prefill", "mixed-prefill"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_cache_in_a_moving_batch_matches_transformers(arch, dtype, mixed: bool) -> None:  # type: ignore[no-untyped-def]
    """bfloat16 has no CPU kernel: it takes the torch path on every architecture."""
    name, folder, reference = arch
    h = Harness(folder, kv_dtype=dtype)
    assert h.generator.kv_cache is not None
    assert all(t.dtype == dtype for t in (*h.generator.kv_cache.keys,
                                          *h.generator.kv_cache.values))
    prompts = {1: prompt(30, 28), 2: prompt(31, 19), 3: prompt(32, 40)}
    budgets = {1: NEW_TOKENS, 2: 12, 3: NEW_TOKENS}
    h.add([h.request(1, prompts[1], budgets[1])])
    for step in range(1, 200):
        if step == 4:
            h.add([h.request(2, prompts[2], budgets[2])], mixed)
        if step == 9:
            h.add([h.request(3, prompts[3], budgets[3])], mixed)
        if step > 9 and not h.batch_ids:
            break
        h.step()
    for rid in (1, 2, 3):
        assert_close_to_reference(reference, h, rid, prompts[rid], TOLERANCE[dtype])
        assert len(h.outputs[rid].ids) == budgets[rid]


def test_float16_cache_read_back_by_a_cached_prefix(arch) -> None:  # type: ignore[no-untyped-def]
    """B's prefill attends to A's first 32 positions as stored in float16."""
    name, folder, reference = arch
    a_ids = prompt(40, 40)
    b_ids = a_ids[:33] + prompt(41, 10)
    h = Harness(folder, kv_dtype=torch.float16)
    a = h.request(1, a_ids, 24)
    h.add([a])
    h.step()
    h.add([h.request(2, b_ids, 24, prefix_of=a, cache_len=32)])
    h.run_to_end()
    assert_close_to_reference(reference, h, 1, a_ids)
    assert_close_to_reference(reference, h, 2, b_ids)


def test_float16_cache_changes_the_numbers_only_by_rounding(arch) -> None:  # type: ignore[no-untyped-def]
    """The float16 run is not the float32 run by accident (a cache that ignored the dtype would
    pass the tests above too): its log-probabilities differ, slightly."""
    name, folder, reference = arch
    ids = prompt(50, 30)
    runs = {}
    for dtype in (torch.float32, torch.float16):
        h = Harness(folder, kv_dtype=dtype)
        h.add([h.request(1, ids, 16)])
        h.run_to_end()
        runs[dtype] = h.outputs[1]
    # Compared while both runs chose the same tokens (a near-tie may split them later).
    same = 0
    while same < 16 and runs[torch.float16].ids[same] == runs[torch.float32].ids[same]:
        same += 1
    assert same > 0
    diffs = [abs(a - b) for a, b in zip(runs[torch.float16].logprobs[:same],
                                        runs[torch.float32].logprobs[:same])]
    assert 0 < max(diffs) < KV_LOGPROB_TOLERANCE


@needs_kernel
def test_kernels_take_the_float16_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """On CPU the fused decode layer keeps running with a float16 cache (no silent torch path)."""
    build("llama", tmp_path)
    calls = count_calls(monkeypatch, decode_layer, "llama_decode_layer")
    h = Harness(tmp_path, kv_dtype=torch.float16)
    h.add([h.request(1, prompt(60, 12), 4)])
    h.run_to_end()
    assert calls[0] > 0
