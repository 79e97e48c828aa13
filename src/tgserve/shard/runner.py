"""Turns batch state into model inputs: flattened varlen prefill and one-token-per-row decode."""

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
    logit_rows: torch.Tensor | None  # rows of the flattened tokens whose logits are needed (None: all)
    # Prefill only: per request, (first, last) index into the returned logits for prompt logprobs.
    prompt_logit_spans: list[tuple[int, int] | None] | None = None
    sample_rows: torch.Tensor | None = None  # which returned logits rows feed sampling


def prepare_prefill(
    requests: list[RequestState], cache_lens: list[int], device: torch.device
) -> ForwardInputs:
    """All prompts flattened without padding; logits only where sampling or prompt logprobs need them."""
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sequences: list[PrefillSequence] = []
    logit_rows: list[int] = []
    spans: list[tuple[int, int] | None] = []
    sample_rows: list[int] = []
    for r, cache_len in zip(requests, cache_lens):
        start, n = len(ids), r.prompt_len - cache_len
        ids.extend(r.all_ids[cache_len : r.prompt_len])
        positions.extend(range(cache_len, r.prompt_len))
        slots.extend(r.slots[cache_len : r.prompt_len])
        kv_slots = None
        if cache_len > 0:
            kv_slots = torch.tensor(r.slots[: r.prompt_len], dtype=torch.long, device=device)
        sequences.append(PrefillSequence(start, n, cache_len, kv_slots))
        if r.prefill_logprobs:
            spans.append((len(logit_rows), len(logit_rows) + n))
            logit_rows.extend(range(start, start + n))
        else:
            spans.append(None)
            logit_rows.append(start + n - 1)
        sample_rows.append(len(logit_rows) - 1)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
    meta = AttentionMetadata(slots=as_long(slots), positions=as_long(positions), prefill=sequences)
    return ForwardInputs(
        input_ids=as_long(ids),
        positions=meta.positions,
        meta=meta,
        logit_rows=as_long(logit_rows),
        prompt_logit_spans=spans,
        sample_rows=as_long(sample_rows),
    )


def prepare_decode(batch: Batch, device: torch.device) -> ForwardInputs:
    """Each row feeds its last token; its context is every slot up to and including that token's."""
    last_ids = [r.all_ids[-1] for r in batch.requests]
    pos = [len(r.all_ids) - 1 for r in batch.requests]
    positions = torch.tensor(pos, dtype=torch.long, device=device)
    rows = torch.arange(len(pos), device=device)
    slots = batch.slot_table[rows, positions]
    lengths = positions + 1
    kv_index = batch.slot_table[:, : max(pos) + 1]
    meta = AttentionMetadata(
        slots=slots, positions=positions, kv_index=kv_index, kv_lengths=lengths
    )
    return ForwardInputs(
        input_ids=torch.tensor(last_ids, dtype=torch.long, device=device),
        positions=positions,
        meta=meta,
        logit_rows=None,
    )
