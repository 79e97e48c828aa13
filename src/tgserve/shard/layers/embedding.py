"""Token embeddings split by vocabulary across ranks, and the LM head that gathers logits back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tgserve.shard.kernels import KernelOps
from tgserve.shard.layers.linear import Linear
from tgserve.shard.loading.weights import Weights


@dataclass
class Embedding:
    weight: torch.Tensor | None  # [vocab / world, hidden]; None when read from `tied`
    vocab_start: int
    world_size: int
    # A tied LM head whose weight is held only as packed panels: rows are read back from them,
    # so the table is in memory once.
    tied: Linear | None = None

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return self._rows(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_size)
        out = self._rows(local.masked_fill(outside, 0))
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(out)
        return out

    @property
    def vocab_size(self) -> int:
        return self.tied.out_features if self.tied is not None else self.weight.shape[0]  # type: ignore[union-attr]

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tied is not None and self.tied.packed is not None:
            rows = self.tied.kernels.packed_rows(
                ids.reshape(-1), self.tied.packed, self.vocab_size
            )
            return rows.view(*ids.shape, rows.shape[-1])
        assert self.weight is not None
        return F.embedding(ids, self.weight)


def load_embedding(weights: Weights, name: str) -> Embedding:
    vocab = weights.get_tensor(name) if weights.world_size == 1 else None
    if vocab is not None:
        return Embedding(vocab, 0, 1)
    weight = weights.get_sharded(name, dim=0)
    return Embedding(weight, weights.rank * weight.shape[0], weights.world_size)


@dataclass
class LMHead:
    linear: Linear  # [vocab / world, hidden]
    world_size: int

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden)
        if self.world_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.all_gather(parts, logits)
        return torch.cat(parts, dim=-1)


def load_lm_head(
    weights: Weights,
    name: str,
    tied_name: str,
    kernels: KernelOps,
    embedding: Embedding | None = None,
) -> LMHead:
    """The LM head; when it is tied to `embedding` (no weight of its own in the checkpoint) and
    gets packed, the embedding reads its rows from the packed panels and drops its own copy."""
    tied = not weights.has(name)
    source = tied_name if tied else name
    weight = weights.get_tensor(source) if weights.world_size == 1 else None
    if weight is None:
        weight = weights.get_sharded(source, dim=0)
    head = LMHead(Linear.of(weight, None, kernels), weights.world_size)
    if tied and embedding is not None and head.linear.packed is not None:
        embedding.weight, embedding.tied = None, head.linear
    return head
