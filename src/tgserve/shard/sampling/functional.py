"""Pure batched logits processors and warpers: [B, V] float32 scores in, new scores out."""

from __future__ import annotations

from collections.abc import Sequence

import torch

WATERMARK_GAMMA = 0.5
WATERMARK_DELTA = 2.0
WATERMARK_HASH_KEY = 15485863

_NEG_INF = float("-inf")


def _col(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-row parameter [B] as a [B, 1] column of the scores' dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).unsqueeze(-1)


def repetition_penalty(
    scores: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """CTRL penalty over seen tokens: negative scores times p, others divided by p.

    scores: [B, V]; counts: [B, V] occurrences in prompt + generated; penalty: [B] (1.0 = off).
    """
    p = _col(penalty, scores)
    penalized = torch.where(scores < 0, scores * p, scores / p)
    return torch.where(counts > 0, penalized, scores)


def frequency_penalty(
    scores: torch.Tensor, counts: torch.Tensor, seq_lens: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """TGI's length-normalised frequency penalty: scores -= count / seq_len * penalty.

    counts: [B, V]; seq_lens: [B] prompt + generated length; penalty: [B] (0 = off).
    """
    per_count = _col(penalty, scores) / _col(seq_lens, scores).clamp_min(1.0)
    # The where keeps off rows bit-identical even for -0.0 scores or a -0.0 penalty.
    active = (counts > 0) & (_col(penalty, scores) != 0)
    return torch.where(active, scores - counts.to(scores.dtype) * per_count, scores)


def additive_frequency_penalty(
    scores: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """OpenAI's frequency penalty: scores -= count * penalty, count taken over generated tokens.

    counts: [B, V]; penalty: [B] (0 = off).
    """
    p = _col(penalty, scores)
    active = (counts > 0) & (p != 0)
    return torch.where(active, scores - counts.to(scores.dtype) * p, scores)


def presence_penalty(
    scores: torch.Tensor, counts: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """OpenAI presence penalty: a flat penalty on every token already present.

    counts: [B, V]; penalty: [B] (0 = off).
    """
    p = _col(penalty, scores)
    return torch.where((counts > 0) & (p != 0), scores - p, scores)


def logit_bias(
    scores: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Add bias[i] to scores[rows[i], token_ids[i]]; untouched entries keep their exact bits.

    rows, token_ids, bias: [N] flat (row, token, bias) triples, pairs unique.
    """
    index = (rows.to(scores.device), token_ids.to(scores.device))
    return scores.index_put(index, bias.to(scores.device, scores.dtype), accumulate=True)


def temperature(scores: torch.Tensor, temp: torch.Tensor) -> torch.Tensor:
    """scores / T per row (T = 1.0 is exact, so off rows are unchanged)."""
    return scores / _col(temp, scores)


def top_k(scores: torch.Tensor, k: torch.Tensor, max_k: int | None = None) -> torch.Tensor:
    """Keep each row's k best scores (ties with the k-th kept), -inf elsewhere; k <= 0 is off.

    k: [B] int; max_k: max(k) when the caller knows it, saving a device sync.
    """
    vocab = scores.shape[-1]
    k = k.to(scores.device, torch.int64).clamp(max=vocab)
    if max_k is None:
        max_k = int(k.max().item())
    max_k = min(max_k, vocab)
    if max_k <= 0:
        return scores.clone()
    best = scores.topk(max_k, dim=-1).values  # [B, max_k], descending
    kth = best.gather(1, (k.clamp(min=1) - 1).unsqueeze(-1))  # [B, 1]
    kth = torch.where(k.unsqueeze(-1) > 0, kth, torch.full_like(kth, _NEG_INF))
    return scores.masked_fill(scores < kth, _NEG_INF)


def _drop_after_mass(
    order: torch.Tensor, sorted_probs: torch.Tensor, mass: torch.Tensor
) -> torch.Tensor:
    """Mask (in original order) of tokens past the shortest sorted prefix holding `mass`.

    A token is dropped when the probability ranked before it already reaches the mass, so the
    first token always stays. mass >= 1 rows drop nothing.
    """
    mass = mass.to(sorted_probs.device, sorted_probs.dtype).unsqueeze(-1)  # [B, 1]
    before = sorted_probs.cumsum(-1) - sorted_probs  # exclusive cumulative mass, [B, V]
    drop_sorted = (before >= mass) & (mass < 1.0)
    return drop_sorted.scatter(1, order, drop_sorted)


def top_p(scores: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the most likely tokens until their mass reaches p; p >= 1 is off."""
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    drop = _drop_after_mass(order, sorted_scores.softmax(-1), p)
    return scores.masked_fill(drop, _NEG_INF)


def typical_p(scores: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Locally typical sampling: keep tokens whose surprise is closest to the entropy, up to mass.

    mass >= 1 is off.
    """
    logp = scores.log_softmax(-1)
    probs = logp.exp()
    entropy = -(probs * logp).nansum(-1, keepdim=True)  # -inf * 0 gives NaN, hence nansum
    gap = (-logp - entropy).abs()
    _, order = gap.sort(dim=-1)
    drop = _drop_after_mass(order, probs.gather(1, order), mass)
    return scores.masked_fill(drop, _NEG_INF)


def greenlist(
    vocab_size: int,
    prev_token: int,
    gamma: float = WATERMARK_GAMMA,
    hash_key: int = WATERMARK_HASH_KEY,
) -> torch.Tensor:
    """Kirchenbauer greenlist for the token after prev_token: [int(V * gamma)] int64 ids (CPU).

    A CPU generator makes the list the same on every device, so a detector needs no GPU.
    """
    rng = torch.Generator(device="cpu")
    rng.manual_seed(hash_key * prev_token)
    return torch.randperm(vocab_size, generator=rng)[: int(vocab_size * gamma)]


def watermark(
    scores: torch.Tensor,
    prev_tokens: Sequence[int],
    enabled: Sequence[bool],
    gamma: float = WATERMARK_GAMMA,
    delta: float = WATERMARK_DELTA,
    hash_key: int = WATERMARK_HASH_KEY,
) -> torch.Tensor:
    """Add delta to each enabled row's greenlist, seeded by that row's previous token."""
    out = scores.clone()
    vocab = scores.shape[-1]
    for row, (prev, on) in enumerate(zip(prev_tokens, enabled)):
        if on:
            green = greenlist(vocab, int(prev), gamma, hash_key).to(scores.device)
            out[row, green] += delta
    return out
