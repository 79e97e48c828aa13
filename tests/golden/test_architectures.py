"""Every architecture against transformers: prefill logits, greedy tokens alone and in a batch."""

from __future__ import annotations

import math

import pytest
import torch

from tests.golden.harness import DEVICE, Harness
from tests.golden.tiny_models import ARCHS, build, reference_greedy
from tgserve.shard.kernels import TORCH_OPS

NEW_TOKENS = 64


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp(request.param)
    reference = build(request.param, folder)
    return request.param, folder, reference


def prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 500, (length,), generator=g).tolist()


hf_greedy = reference_greedy


# 150 tokens: a prefill past the packed linear's AMX threshold (80 rows) where the CPU has AMX.
@pytest.mark.parametrize("length", [40, 150])
def test_prefill_logits_match(arch, length: int) -> None:  # type: ignore[no-untyped-def]
    name, folder, reference = arch
    h = Harness(folder)
    ids = prompt(1, length)
    h.add([h.request(1, ids, 1, prefill_logprobs=True, top_n_tokens=3)])
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), -1)
    expected = [ref[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    got = h.outputs[1].prefill
    assert got is not None and math.isnan(got[0])
    assert torch.allclose(torch.tensor(got[1:]), torch.tensor(expected), atol=1e-4)
    # Each prompt position's best 3 alternatives (the first position has none).
    tops = h.outputs[1].prefill_top
    assert tops is not None and len(tops) == len(ids) and tops[0] == ([], [])
    best = ref[:-1].topk(3, dim=-1)
    for t, (top_ids, top_lps) in enumerate(tops[1:]):
        assert top_ids == best.indices[t].tolist()
        assert torch.allclose(torch.tensor(top_lps), best.values[t], atol=1e-4)


def test_prefill_raw_logits_match(arch) -> None:  # type: ignore[no-untyped-def]
    name, folder, reference = arch
    h = Harness(folder)
    ids = prompt(2, 33)
    req = h.request(1, ids, 1)
    from tgserve.shard.runner import prepare_prefill

    state = h.generator._request_state(req)
    inputs = prepare_prefill([state], [0], DEVICE)
    inputs.logit_rows = None
    logits, _ = h.generator._forward(inputs)
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0].float()
    assert (logits.cpu() - ref).abs().max().item() < 1e-4


def test_last_layer_runs_past_attention_on_logit_rows_only(arch) -> None:  # type: ignore[no-untyped-def]
    """A prefill of two prompts needs two rows of logits: the last layer's MLP sees those two rows
    and nothing else, and the logits still match transformers' at the prompts' last tokens."""
    name, folder, reference = arch
    h = Harness(folder)
    prompts = [prompt(4, 21), prompt(5, 13)]
    from tgserve.shard.runner import prepare_prefill

    states = [h.generator._request_state(h.request(i, ids, 1)) for i, ids in enumerate(prompts)]
    inputs = prepare_prefill(states, [0, 0], DEVICE)
    assert inputs.logit_rows is not None and inputs.logit_rows.tolist() == [20, 33]
    last, seen = h.generator.model.layers[-1], []
    mlp = last.mlp

    def counting_mlp(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return mlp(x)

    last.mlp = counting_mlp
    logits, _ = h.generator._forward(inputs)
    assert seen == [2] and logits.shape[0] == 2
    with torch.no_grad():
        for row, ids in zip(logits.cpu(), prompts):
            ref = reference(torch.tensor([ids])).logits[0, -1].float()
            assert (row - ref).abs().max().item() < 1e-4


def test_greedy_alone_matches_transformers(arch) -> None:  # type: ignore[no-untyped-def]
    name, folder, reference = arch
    ids = prompt(3, 30)
    expected, expected_lp = hf_greedy(reference, ids, NEW_TOKENS)
    h = Harness(folder)
    h.add([h.request(1, ids, NEW_TOKENS)])
    h.run_to_end()
    out = h.outputs[1]
    assert out.ids == expected
    assert max(abs(a - b) for a, b in zip(out.logprobs, expected_lp)) < 1e-4
    assert out.finish is not None and out.finish.generated_text.generated_tokens == NEW_TOKENS


@pytest.mark.parametrize("ahead", [False, True], ids=["on-demand", "decode-ahead"])
@pytest.mark.parametrize("mixed", [False, True], ids=["separate-prefill", "mixed-prefill"])
def test_greedy_inside_a_moving_batch(arch, mixed: bool, ahead: bool) -> None:  # type: ignore[no-untyped-def]
    """A runs; B joins at step 5, C at step 12; B leaves early (short budget), D is cancelled.

    With `mixed`, joining prompts are computed in the same forward as the running rows' next tokens.
    With `ahead`, each step is computed before it is asked for, so every join, leave and cancel
    meets a step already done (as on a shard with small batches).
    """
    name, folder, reference = arch
    prompts = {1: prompt(10, 30), 2: prompt(11, 17), 3: prompt(12, 41), 4: prompt(13, 9)}
    budgets = {1: NEW_TOKENS, 2: 20, 3: NEW_TOKENS, 4: NEW_TOKENS}
    h = Harness(folder, ahead=ahead)
    h.add([h.request(1, prompts[1], budgets[1])])
    for step in range(1, 200):
        if step == 5:
            h.add([h.request(2, prompts[2], budgets[2]), h.request(4, prompts[4], budgets[4])],
                  mixed)
        if step == 12:
            h.add([h.request(3, prompts[3], budgets[3])], mixed)
        if step == 15:
            h.cancel(4)
        if step > 12 and not h.batch_ids:
            break
        h.step()
        if step == 13:
            assert set(h.running) == {1, 2, 3, 4}  # everyone shares one batch
        if step == 16:
            assert 4 not in h.running  # the cancelled request left at once
    assert 2 not in h.running
    for rid in (1, 2, 3):
        expected, _ = hf_greedy(reference, prompts[rid], budgets[rid])
        assert h.outputs[rid].ids == expected, f"request {rid} diverged ({name})"
    assert h.outputs[4].finish is None  # cancelled before its end


@pytest.mark.parametrize("mixed", [False, True], ids=["separate-prefill", "mixed-prefill"])
def test_greedy_from_a_cached_prefix(arch, mixed: bool) -> None:  # type: ignore[no-untyped-def]
    """B and C skip the first 32 prompt tokens, whose KV A computed: their tokens are unchanged.

    B shares A's first 33 tokens then goes its own way; C is A's prompt again (the `n` > 1 case).
    Both join while A decodes, so the cached blocks are read while A still uses them.
    """
    name, folder, reference = arch
    a_ids = prompt(20, 40)
    b_ids = a_ids[:33] + prompt(21, 14)
    h = Harness(folder)
    a = h.request(1, a_ids, NEW_TOKENS)
    h.add([a])
    for _ in range(3):
        h.step()
    b = h.request(2, b_ids, 24, prefix_of=a, cache_len=32)
    c = h.request(3, a_ids, 24, prefix_of=a, cache_len=32)
    forward = h.generator._forward
    computed: list[int] = []

    def counted(inputs):  # type: ignore[no-untyped-def]
        computed.append(len(inputs.input_ids))
        return forward(inputs)

    h.generator._forward = counted
    h.add([b, c], mixed)
    # Only the uncached prompt tokens ran (plus A's next token when mixed).
    assert computed == [(47 - 32) + (40 - 32) + (1 if mixed else 0)]
    h.run_to_end()
    expected_a, lp_a = hf_greedy(reference, a_ids, NEW_TOKENS)
    expected_b, lp_b = hf_greedy(reference, b_ids, 24)
    assert h.outputs[1].ids == expected_a
    assert h.outputs[2].ids == expected_b, f"prefix-cached request diverged ({name})"
    assert h.outputs[3].ids == expected_a[:24]
    assert max(abs(x - y) for x, y in zip(h.outputs[2].logprobs, lp_b)) < 1e-4
    assert max(abs(x - y) for x, y in zip(h.outputs[3].logprobs, lp_a)) < 1e-4


def test_torch_ops_match_transformers(arch) -> None:  # type: ignore[no-untyped-def]
    """The torch implementation of every op (a GPU's, or a CPU's without the C++ kernels) end to
    end: greedy tokens alone, then two prompts that continue A's cached prefix in a mixed step."""
    name, folder, reference = arch
    a_ids = prompt(20, 40)
    b_ids = a_ids[:33] + prompt(21, 14)
    h = Harness(folder, kernels=TORCH_OPS)
    assert h.generator.model.kernels is TORCH_OPS
    a = h.request(1, a_ids, NEW_TOKENS)
    h.add([a])
    for _ in range(3):
        h.step()
    b = h.request(2, b_ids, 24, prefix_of=a, cache_len=32)
    h.add([b, h.request(3, prompt(22, 19), 24)], mixed=True)
    h.run_to_end()
    expected_a, lp_a = hf_greedy(reference, a_ids, NEW_TOKENS)
    expected_b, lp_b = hf_greedy(reference, b_ids, 24)
    expected_c, _ = hf_greedy(reference, prompt(22, 19), 24)
    assert h.outputs[1].ids == expected_a, f"torch ops diverged ({name})"
    assert h.outputs[2].ids == expected_b, f"prefix-cached request diverged on torch ops ({name})"
    assert h.outputs[3].ids == expected_c
    assert max(abs(x - y) for x, y in zip(h.outputs[1].logprobs, lp_a)) < 1e-4
    assert max(abs(x - y) for x, y in zip(h.outputs[2].logprobs, lp_b)) < 1e-4
