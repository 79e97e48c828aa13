"""Turns batch state into model inputs: decode rows and varlen prefill tokens in one forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tgserve.shard.batch import Batch, RequestState
from tgserve.shard.layers.attention.metadata import AttentionMetadata, PrefillSequence


@dataclass
class ForwardInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logit_rows: torch.Tensor | None  # rows of the flat tokens whose logits are needed (None: all)
    # Which returned logits rows feed sampling: every decode row, then each new prompt's last token.
    sample_rows: torch.Tensor | None = None
    # Per new request: (first, last) rows of the returned logits for prompt logprobs, if asked.
    prompt_logit_spans: list[tuple[int, int] | None] | None = None


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def prepare_decode(batch: Batch, device: torch.device) -> ForwardInputs:
    """Each row feeds its last token; its context is every slot up to and including that token's."""
    return prepare_forward(batch, [], [], device)


def prepare_prefill(
    requests: list[RequestState], cache_lens: list[int], device: torch.device
) -> ForwardInputs:
    return prepare_forward(None, requests, cache_lens, device)


def prepare_forward(
    running: Batch | None,
    requests: list[RequestState],
    cache_lens: list[int],
    device: torch.device,
) -> ForwardInputs:
    """One forward for the running batch's next tokens (first) and new prompts (after them).

    New prompts are flattened without padding; logits are computed only where sampling or prompt
    log-probabilities need them, so a long prompt costs one row of the LM head, not thousands.
    """
    num_decode = len(running) if running is not None else 0
    ids: list[int] = []
    positions: list[int] = []
    if running is not None:
        ids = [r.all_ids[-1] for r in running.requests]
        positions = [len(r.all_ids) - 1 for r in running.requests]
    logit_rows = list(range(num_decode))
    sample_rows = list(range(num_decode))
    slots_new: list[int] = []
    sequences: list[PrefillSequence] = []
    spans: list[tuple[int, int] | None] = []
    for r, cache_len in zip(requests, cache_lens):
        start, n = len(ids), r.prompt_len - cache_len
        ids.extend(r.all_ids[cache_len : r.prompt_len])
        positions.extend(range(cache_len, r.prompt_len))
        slots_new.extend(r.slots[cache_len : r.prompt_len])
        kv_slots = _long(r.slots[: r.prompt_len], device) if cache_len > 0 else None
        sequences.append(PrefillSequence(start, n, cache_len, kv_slots))
        if r.prefill_logprobs:
            spans.append((len(logit_rows), len(logit_rows) + n))
            logit_rows.extend(range(start, start + n))
        else:
            spans.append(None)
            logit_rows.append(start + n - 1)
        sample_rows.append(len(logit_rows) - 1)
    pos = _long(positions, device)
    meta = AttentionMetadata(slots=_long(slots_new, device), positions=pos,
                             prefill=sequences or None, num_decode=num_decode)
    if running is not None:
        decode_pos = pos[:num_decode]
        rows = torch.arange(num_decode, device=device)
        decode_slots = running.slot_table[rows, decode_pos]
        meta.slots = torch.cat([decode_slots, meta.slots])
        meta.kv_index = running.slot_table[:, : int(max(positions[:num_decode])) + 1]
        meta.kv_lengths = decode_pos + 1
    everything = len(logit_rows) == len(ids) and logit_rows == list(range(len(ids)))
    return ForwardInputs(
        input_ids=_long(ids, device),
        positions=pos,
        meta=meta,
        logit_rows=None if everything else _long(logit_rows, device),
        sample_rows=_long(sample_rows, device),
        prompt_logit_spans=spans,
    )
