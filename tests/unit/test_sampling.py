"""Sampling: each op against a naive per-row reference, chooser order, determinism, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from tgserve.shard.kernels import select_ops
from tgserve.shard.sampling import functional as F
from tgserve.shard.sampling import logprobs as LP
from tgserve.shard.sampling.chooser import NextTokenChooser
from tgserve.shard.sampling.logprobs import batch_top_tokens, prompt_logprobs
from tgserve.shard.sampling.params import SamplingParams

CPU = torch.device("cpu")
NEG_INF = float("-inf")


def _logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, vocab, generator=gen) * 3
    scores[:, 0] = -0.0  # bit-identity must hold for signed zeros too
    scores[:, 1] = NEG_INF
    return scores


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _counts(batch: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    counts = torch.randint(0, 3, (batch, vocab), generator=gen).float()
    counts[:, 0] = 1.0  # the -0.0 column is "seen" in every row
    return counts


# ---------------------------------------------------------------- functional ops vs naive loops


def test_repetition_penalty_matches_ctrl_rule_and_keeps_neutral_rows() -> None:
    scores, counts = _logits(4, 12), _counts(4, 12)
    penalty = torch.tensor([1.0, 1.5, 0.7, 1.0])
    out = F.repetition_penalty(scores, counts, penalty)
    expected = scores.clone()
    for b in range(4):
        for v in range(12):
            s, p = scores[b, v].item(), penalty[b].item()
            if counts[b, v] > 0 and p != 1.0:
                expected[b, v] = s * p if s < 0 else s / p
    assert torch.equal(out, expected)
    assert _same_bits(out[0], scores[0]) and _same_bits(out[3], scores[3])
    assert not torch.equal(out[1], scores[1])


def test_frequency_penalty_is_normalised_by_length() -> None:
    scores, counts = _logits(3, 10), _counts(3, 10)
    seq_lens = torch.tensor([7.0, 4.0, 9.0])
    penalty = torch.tensor([0.0, 1.2, -0.5])
    out = F.frequency_penalty(scores, counts, seq_lens, penalty)
    for b in range(3):
        for v in range(2, 10):
            shift = counts[b, v].item() / seq_lens[b].item() * penalty[b].item()
            want = scores[b, v].item() - shift
            assert out[b, v].item() == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert _same_bits(out[0], scores[0])
    assert _same_bits(F.frequency_penalty(scores, counts, seq_lens, torch.full((3,), -0.0)), scores)


def test_additive_frequency_penalty_is_openai_formula() -> None:
    scores = torch.tensor([[1.0, 2.0, -1.0, 0.5]])
    counts = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    out = F.additive_frequency_penalty(scores, counts, torch.tensor([0.5]))
    assert out.tolist() == [[1.0, 0.5, -1.5, 0.5]]  # 2 - 3*0.5, -1 - 1*0.5
    off = F.additive_frequency_penalty(scores, counts, torch.tensor([0.0]))
    assert torch.equal(off, scores)


def test_presence_penalty_flat_on_present_tokens() -> None:
    scores, counts = _logits(3, 10), _counts(3, 10)
    penalty = torch.tensor([0.0, 0.8, -0.3])
    out = F.presence_penalty(scores, counts, penalty)
    for b in range(3):
        for v in range(10):
            present = counts[b, v] > 0 and penalty[b] != 0
            want = scores[b, v] - penalty[b] if present else scores[b, v]
            assert _same_bits(out[b, v : v + 1], want.reshape(1))
    assert _same_bits(out[0], scores[0])


def test_logit_bias_touches_only_listed_entries() -> None:
    scores = _logits(3, 8)
    out = F.logit_bias(
        scores, torch.tensor([1, 1, 2]), torch.tensor([3, 0, 7]), torch.tensor([5.0, -2.0, 1.5])
    )
    expected = scores.clone()
    expected[1, 3] += 5.0
    expected[1, 0] += -2.0
    expected[2, 7] += 1.5
    assert torch.equal(out, expected)
    assert _same_bits(out[0], scores[0])
    assert _same_bits(out[1, 4:], scores[1, 4:])


def test_temperature_divides_and_one_is_exact() -> None:
    scores = _logits(3, 9)
    out = F.temperature(scores, torch.tensor([1.0, 0.5, 2.0]))
    assert _same_bits(out[0], scores[0])
    assert torch.equal(out[1], scores[1] / 0.5)
    assert torch.equal(out[2], scores[2] / 2.0)


def _naive_top_k(row: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= row.numel():
        return row.clone()
    kth = sorted(row.tolist(), reverse=True)[k - 1]
    return torch.tensor([x if x >= kth else NEG_INF for x in row.tolist()])


def test_top_k_against_naive_including_ties() -> None:
    scores = _logits(4, 12, seed=3)
    scores[2, 4] = scores[2, 5] = scores[2].max() + 1  # a tie at the k-th place keeps both
    k = torch.tensor([0, 3, 1, 50])
    out = F.top_k(scores, k)
    for b in range(4):
        assert torch.equal(out[b], _naive_top_k(scores[b], int(k[b])))
    assert int(torch.isfinite(out[2]).sum()) == 2
    assert _same_bits(out[0], scores[0]) and _same_bits(out[3], scores[3])
    assert torch.equal(F.top_k(scores, k, max_k=50), out)


def _naive_nucleus(row: torch.Tensor, order: list[int], probs: list[float], mass: float) -> set:
    if mass >= 1.0:
        return set(range(row.numel()))
    kept, total = set(), 0.0
    for tok in order:
        if total >= mass:
            break
        kept.add(tok)
        total += probs[tok]
    return kept


def _finite_set(row: torch.Tensor) -> set:
    return {i for i, x in enumerate(row.tolist()) if x != NEG_INF}


def test_top_p_against_naive() -> None:
    scores = _logits(4, 16, seed=5)
    p = torch.tensor([1.0, 0.3, 0.6, 0.9])
    out = F.top_p(scores, p)
    for b in range(4):
        probs = torch.softmax(scores[b].double(), -1).tolist()
        order = sorted(range(16), key=lambda t: -probs[t])
        kept = _naive_nucleus(scores[b], order, probs, float(p[b])) - {1}
        assert _finite_set(out[b]) == kept
        assert torch.equal(out[b][list(kept)], scores[b][list(kept)])
    assert _same_bits(out[0], scores[0])


def test_typical_p_against_naive() -> None:
    scores = _logits(4, 16, seed=6)
    mass = torch.tensor([0.5, 1.0, 0.2, 0.95])
    out = F.typical_p(scores, mass)
    for b in range(4):
        logp = torch.log_softmax(scores[b].double(), -1)
        probs = logp.exp().tolist()
        entropy = -sum(p * lp for p, lp in zip(probs, logp.tolist()) if p > 0)
        gap = [abs(-lp - entropy) for lp in logp.tolist()]
        order = sorted(range(16), key=lambda t: gap[t])
        kept = _naive_nucleus(scores[b], order, probs, float(mass[b])) - {1}
        assert _finite_set(out[b]) == kept
    assert _same_bits(out[1], scores[1])


def test_greenlist_is_seeded_by_previous_token() -> None:
    green = F.greenlist(100, 42)
    assert green.numel() == 50 and green.unique().numel() == 50
    rng = torch.Generator().manual_seed(F.WATERMARK_HASH_KEY * 42)
    assert torch.equal(green, torch.randperm(100, generator=rng)[:50])
    assert torch.equal(green, F.greenlist(100, 42))
    assert not torch.equal(green, F.greenlist(100, 43))
    assert F.greenlist(100, 42, gamma=0.25).numel() == 25


def test_watermark_adds_delta_on_greenlist_only() -> None:
    scores = _logits(3, 40)
    out = F.watermark(scores, [5, 9, 11], [True, False, True], gamma=0.5, delta=2.0)
    assert _same_bits(out[1], scores[1])
    for b, prev in ((0, 5), (2, 11)):
        green = F.greenlist(40, prev)
        expected = scores[b].clone()
        expected[green] += 2.0
        assert torch.equal(out[b], expected)


# ----------------------------------------------------------------------------- the chooser


def _chooser(params: list[SamplingParams], prompts: list[list[int]], vocab: int):
    # The ops a CPU model gets: the C++ greedy choice where the kernels build.
    return NextTokenChooser.from_params(params, prompts, vocab, CPU, select_ops(CPU))


def test_greedy_fast_path_is_argmax_and_pure() -> None:
    logits = torch.randn(5, 30)
    before = logits.clone()
    chooser = _chooser([SamplingParams()] * 5, [[1, 2]] * 5, 30)
    assert chooser.state == {}  # no penalty state allocated for plain greedy rows
    out = chooser(logits)
    assert torch.equal(logits, before)
    assert torch.equal(out.next_ids, logits.argmax(-1))
    assert out.next_ids.dtype == torch.int64
    want = torch.log_softmax(logits, -1)
    assert torch.allclose(out.all_logprobs, want)
    assert torch.allclose(out.logprobs, want.gather(1, out.next_ids[:, None]).squeeze(1))


def test_half_precision_logits_give_float32_logprobs() -> None:
    logits = torch.randn(2, 16).to(torch.bfloat16)
    out = _chooser([SamplingParams(), SamplingParams(top_k=3, seed=1)], [[1], [2]], 16)(logits)
    assert out.all_logprobs.dtype == torch.float32 and out.logprobs.dtype == torch.float32
    assert out.next_ids[0] == logits[0].argmax()


def test_logits_shape_is_checked() -> None:
    with pytest.raises(ValueError):
        _chooser([SamplingParams()], [[1]], 16)(torch.randn(1, 17))


def _reference_scores(
    logits: torch.Tensor, p: SamplingParams, history: list[int], generated: list[int]
) -> torch.Tensor:
    """One row through the TGI order with the functional ops, built the slow way."""
    vocab = logits.numel()
    row = logits.clone()[None]
    seen = torch.bincount(torch.tensor(history), minlength=vocab).float()[None]
    gen = torch.bincount(torch.tensor(generated or [0]), minlength=vocab).float()[None]
    if not generated:
        gen.zero_()
    if p.watermark:
        row = F.watermark(row, [history[-1]], [True])
    row = F.repetition_penalty(row, seen, torch.tensor([p.repetition_penalty]))
    row = F.frequency_penalty(
        row, seen, torch.tensor([float(len(history))]), torch.tensor([p.frequency_penalty])
    )
    row = F.additive_frequency_penalty(row, gen, torch.tensor([p.additive_frequency_penalty]))
    row = F.presence_penalty(row, gen, torch.tensor([p.presence_penalty]))
    for tok, bias in p.logit_bias.items():
        row[0, tok] += bias
    row = F.temperature(row, torch.tensor([p.temperature]))
    row = F.top_k(row, torch.tensor([p.top_k]))
    row = F.top_p(row, torch.tensor([p.top_p]))
    row = F.typical_p(row, torch.tensor([p.typical_p]))
    return row[0]


MIXED = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.4),
    SamplingParams(frequency_penalty=0.9, presence_penalty=0.5, logit_bias={3: 4.0, 7: -9.0}),
    SamplingParams(additive_frequency_penalty=0.7, presence_penalty=-0.3),
    SamplingParams(do_sample=True, seed=11, temperature=0.7, top_k=6),
    SamplingParams(watermark=True, top_p=0.8, seed=3),
    SamplingParams(typical_p=0.6, seed=4, repetition_penalty=0.8),
    SamplingParams(do_sample=True, seed=5),
]


def test_chooser_applies_each_rows_ops_in_tgi_order() -> None:
    vocab = 24
    prompts = [[i % vocab, (3 * i + 1) % vocab, 3] for i in range(len(MIXED))]
    chooser = _chooser(MIXED, prompts, vocab)
    histories = [list(p) for p in prompts]
    generated: list[list[int]] = [[] for _ in MIXED]
    for step in range(3):
        logits = torch.randn(len(MIXED), vocab, generator=torch.Generator().manual_seed(step))
        out = chooser(logits)
        for b, p in enumerate(MIXED):
            ref = _reference_scores(logits[b], p, histories[b], generated[b])
            assert torch.allclose(out.all_logprobs[b], torch.log_softmax(ref, -1), atol=1e-5)
            if not p.sampling:
                assert out.next_ids[b] == ref.argmax()
        chooser.advance(out.next_ids)
        for b, tok in enumerate(out.next_ids.tolist()):
            histories[b].append(tok)
            generated[b].append(tok)


def test_call_is_repeatable_until_advance() -> None:
    chooser = _chooser([SamplingParams(do_sample=True, seed=9, repetition_penalty=2.0)], [[1]], 50)
    logits = torch.zeros(1, 50)
    first, again = chooser(logits), chooser(logits)
    assert torch.equal(first.next_ids, again.next_ids)
    assert torch.equal(chooser.state["seen_counts"], _chooser(
        [SamplingParams(repetition_penalty=2.0)], [[1]], 50).state["seen_counts"])
    draws = []
    for _ in range(8):
        out = chooser(logits)
        chooser.advance(out.next_ids)
        draws.append(int(out.next_ids))
    assert len(set(draws)) > 1  # the generator moves on once a step is committed


def test_penalty_counts_cover_prompt_and_generated() -> None:
    params = [SamplingParams(repetition_penalty=1.2), SamplingParams(presence_penalty=0.5)]
    chooser = _chooser(params, [[4, 4, 2], [1]], 8)
    seen, gen = chooser.state["seen_counts"], chooser.state["generated_counts"]
    assert seen[0].tolist() == [0, 0, 1, 0, 2, 0, 0, 0]
    assert seen[1].sum() == 0  # a row without a repetition penalty is not counted
    assert gen.sum() == 0  # presence counts generated tokens only
    chooser.advance(torch.tensor([2, 6]))
    assert chooser.state["seen_counts"][0, 2] == 2
    assert chooser.state["generated_counts"][1].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]


def test_filter_and_concatenate_keep_params_and_state() -> None:
    vocab = 16
    a = _chooser(MIXED[:4], [[1, 2], [3, 3], [5], [6, 7]], vocab)
    b = _chooser(MIXED[4:], [[8], [9, 9], [10]], vocab)
    a.advance(torch.tensor([1, 2, 3, 4]))
    b.advance(torch.tensor([5, 6, 7]))
    merged = NextTokenChooser.concatenate([a, b])
    assert merged.params == tuple(MIXED)
    assert torch.equal(merged.state["seen_counts"][:4], a.state["seen_counts"])
    assert merged.state["last_ids"][4] == 5  # watermark row's previous token survives
    kept = merged.filter([5, 1, 4])
    assert kept.params == (MIXED[5], MIXED[1], MIXED[4])
    assert torch.equal(kept.state["seen_counts"][1], a.state["seen_counts"][1])
    assert torch.equal(kept.state["seen_counts"][0], b.state["seen_counts"][1])
    assert "generated_counts" not in kept.state  # no presence row left: freed
    assert kept.generators[0] is b.generators[1]
    assert kept.filter([]).params == ()


def _step_logits(request: int, step: int, vocab: int) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(1000 * request + step)) * 2


TARGET = SamplingParams(
    do_sample=True, seed=1234, temperature=0.9, top_k=30, top_p=0.95,
    repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3, logit_bias={2: 1.5},
)
OTHERS = {
    0: SamplingParams(),
    1: SamplingParams(do_sample=True, seed=77),
    2: SamplingParams(temperature=0.5, seed=2, top_k=4),
    4: SamplingParams(watermark=True, repetition_penalty=1.1),
    5: SamplingParams(typical_p=0.7, seed=5),
    6: SamplingParams(top_p=0.5, seed=1234),
    7: SamplingParams(frequency_penalty=1.0, logit_bias={9: -5.0}),
    8: SamplingParams(do_sample=True, seed=8, presence_penalty=1.0),
    9: SamplingParams(),
}
PROMPTS = {r: [r, r + 1, 2 * r] for r in range(10)}


def _run(chooser: NextTokenChooser, order: list[int], step: int, vocab: int, out: dict) -> None:
    logits = torch.stack([_step_logits(r, step, vocab) for r in order])
    result = chooser(logits)
    chooser.advance(result.next_ids)
    for row, r in enumerate(order):
        out.setdefault(r, []).append((int(result.next_ids[row]), float(result.logprobs[row])))


def test_seeded_row_is_batch_independent_across_filter_and_concatenate() -> None:
    vocab = 64
    solo = _chooser([TARGET], [PROMPTS[3]], vocab)
    alone: dict[int, list] = {}
    for step in range(7):
        _run(solo, [3], step, vocab, alone)

    params = {**OTHERS, 3: TARGET}
    order = list(range(8))
    batch = _chooser([params[r] for r in order], [PROMPTS[r] for r in order], vocab)
    seen: dict[int, list] = {}
    for step in range(7):
        if step == 2:  # two requests finish
            order, batch = [1, 2, 3, 4, 6, 7], batch.filter([1, 2, 3, 4, 6, 7])
        if step == 3:  # two new requests join in front
            fresh = _chooser([params[8], params[9]], [PROMPTS[8], PROMPTS[9]], vocab)
            order, batch = [8, 9, *order], NextTokenChooser.concatenate([fresh, batch])
        if step == 5:  # reorder and shrink
            keep = [order.index(r) for r in (7, 3, 8)]
            order, batch = [7, 3, 8], batch.filter(keep)
        _run(batch, order, step, vocab, seen)
    assert seen[3] == alone[3]
    greedy = [int(_step_logits(3, s, vocab).argmax()) for s in range(7)]
    assert [tok for tok, _ in alone[3]] != greedy  # it really sampled
    other_seed = _chooser([SamplingParams(**{**TARGET.__dict__, "seed": 99})], [PROMPTS[3]], vocab)
    different: dict[int, list] = {}
    for step in range(7):
        _run(other_seed, [3], step, vocab, different)
    assert different[3] != alone[3]


def _sample_many(params: list[SamplingParams], row_logits: torch.Tensor) -> list[int]:
    chooser = _chooser(params, [[0]] * len(params), row_logits.numel())
    return chooser(row_logits.expand(len(params), -1).clone()).next_ids.tolist()


def test_top_k_never_samples_outside_its_set() -> None:
    row = torch.randn(40, generator=torch.Generator().manual_seed(1))
    allowed = set(row.topk(3).indices.tolist())
    picks = _sample_many([SamplingParams(top_k=3, seed=s) for s in range(400)], row)
    assert set(picks) <= allowed
    assert len(set(picks)) == 3


def test_top_p_never_samples_outside_its_set() -> None:
    probs = torch.tensor([0.05, 0.5, 0.02, 0.3, 0.1, 0.03])
    picks = _sample_many([SamplingParams(top_p=0.75, seed=s) for s in range(400)], probs.log())
    assert set(picks) == {1, 3}  # 0.5 + 0.3 reaches 0.75; everything else is cut


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    picks = _sample_many([SamplingParams(do_sample=True, seed=s) for s in range(3000)], probs.log())
    freq = [picks.count(t) / len(picks) for t in range(3)]
    assert freq == pytest.approx([0.6, 0.3, 0.1], abs=0.04)


def test_same_seed_rows_draw_the_same_tokens() -> None:
    row = torch.randn(30)
    picks = _sample_many([SamplingParams(do_sample=True, seed=42)] * 2, row)
    assert picks[0] == picks[1]


# ----------------------------------------------------------------------------------- logprobs


def test_batch_top_tokens_keeps_ties_and_clamps() -> None:
    logprobs = torch.log_softmax(torch.tensor([
        [1.0, 3.0, 2.0, 2.0, 0.0],
        [0.0, 1.0, 2.0, 3.0, 4.0],
        [5.0, 4.0, 3.0, 2.0, 1.0],
        [1.0, 1.0, 1.0, 1.0, 1.0],
    ]), -1)
    out = batch_top_tokens([2, 9, 0, 1], logprobs)
    ids0, lp0 = out[0]
    assert ids0[0] == 1 and sorted(ids0[1:]) == [2, 3]  # n=2 but 2.0 ties for second place
    assert lp0 == pytest.approx(logprobs[0, ids0].tolist())
    assert out[1][0] == [4, 3, 2, 1, 0]  # n clamped to the vocabulary
    assert out[2] == ([], [])
    assert sorted(out[3][0]) == [0, 1, 2, 3, 4]  # all tie with the first
    assert batch_top_tokens([0, 0], logprobs[:2]) == [([], []), ([], [])]


def test_batch_top_tokens_skips_impossible_tokens() -> None:
    logprobs = torch.tensor([[0.0, NEG_INF, NEG_INF, NEG_INF]])
    assert batch_top_tokens([3], logprobs) == [([0], [0.0])]


def test_prompt_logprobs_matches_log_softmax(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LP, "_PROMPT_CHUNK", 3)  # several chunks on a short prompt
    logits = torch.randn(8, 20)
    targets = torch.randint(0, 20, (8,))
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    got = prompt_logprobs(logits, targets)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-6)
    assert prompt_logprobs(logits[:0], targets[:0]).numel() == 0
    with pytest.raises(ValueError):
        prompt_logprobs(logits, targets[:5])
    assert not math.isnan(float(got.sum()))
