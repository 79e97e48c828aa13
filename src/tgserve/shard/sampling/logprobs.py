"""Log-probability reports: per-row top-n alternatives and prompt (prefill) token logprobs."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Rows per chunk in prompt_logprobs: bounds the float32 temporaries to ~chunk x V.
_PROMPT_CHUNK = 512


def batch_top_tokens(
    top_n_tokens: Sequence[int], logprobs: torch.Tensor
) -> list[tuple[list[int], list[float]]]:
    """Per row, the best n (token ids, logprobs), best first; ties with the n-th are all kept.

    logprobs: [B, V]. n is clamped to V; a row with n = 0 gives ([], []). As in TGI, impossible
    (-inf) tokens never fill the list, so a row may get fewer than n when few tokens are possible.
    """
    vocab = logprobs.shape[-1]
    ns = [min(max(int(n), 0), vocab) for n in top_n_tokens]
    max_n = max(ns, default=0)
    if max_n == 0:
        return [([], []) for _ in ns]
    n = torch.tensor(ns, dtype=torch.int64, device=logprobs.device)
    best = logprobs.topk(max_n, dim=-1).values  # [B, max_n], descending
    nth = best.gather(1, (n.clamp(min=1) - 1).unsqueeze(-1))  # [B, 1]
    # A -inf cut-off would admit every impossible token; the lowest finite value admits none.
    nth = torch.where(torch.isneginf(nth), torch.finfo(logprobs.dtype).min, nth)
    kept = torch.where(n > 0, (logprobs >= nth).sum(dim=-1), 0)  # [B], >= n through ties
    counts = kept.tolist()
    top = logprobs.topk(max(counts), dim=-1)  # sorted, so each row's first `count` are its set
    ids, values = top.indices.tolist(), top.values.tolist()
    return [(ids[row][:c], values[row][:c]) for row, c in enumerate(counts)]


def prompt_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Logprob of input_ids[j] under logits[j], for j in range(N): [N] float32.

    For a prompt t_0..t_{T-1}, pass the logits of positions 0..T-2 and ids t_1..t_{T-1}: each
    value is then log P(t_{j+1} | t_0..t_j). The caller prepends NaN for t_0, which has none.
    Chunked so a long prompt never materialises a full [T, V] log_softmax.
    """
    if logits.shape[0] != input_ids.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows for {input_ids.shape[0]} ids")
    ids = input_ids.to(logits.device, torch.int64).unsqueeze(-1)  # [N, 1]
    parts: list[torch.Tensor] = []
    for start in range(0, logits.shape[0], _PROMPT_CHUNK):
        chunk = logits[start : start + _PROMPT_CHUNK].float()  # [C, V]
        picked = chunk.gather(1, ids[start : start + _PROMPT_CHUNK]).squeeze(-1)
        parts.append(picked - torch.logsumexp(chunk, dim=-1))
    if not parts:
        return torch.empty(0, dtype=torch.float32, device=logits.device)
    return torch.cat(parts)


def prompt_top_tokens(logits: torch.Tensor, n: int) -> list[tuple[list[int], list[float]]]:
    """The best n alternatives (ids, logprobs) after each of `logits`' rows, as batch_top_tokens
    picks them; chunked like prompt_logprobs so a long prompt never holds a full [T, V] tensor."""
    out: list[tuple[list[int], list[float]]] = []
    for start in range(0, logits.shape[0], _PROMPT_CHUNK):
        chunk = torch.log_softmax(logits[start : start + _PROMPT_CHUNK].float(), dim=-1)
        out += batch_top_tokens([n] * chunk.shape[0], chunk)
    return out
