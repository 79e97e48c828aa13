"""Token embeddings split by vocabulary across ranks, and the LM head that gathers logits back."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tgserve.shard.layers.linear import linear
from tgserve.shard.loading.weights import Weights


@dataclass
class Embedding:
    weight: torch.Tensor  # [vocab / world, hidden]
    vocab_start: int
    world_size: int

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        dist.all_reduce(out)
        return out


def load_embedding(weights: Weights, name: str) -> Embedding:
    vocab = weights.get_tensor(name) if weights.world_size == 1 else None
    if vocab is not None:
        return Embedding(vocab, 0, 1)
    weight = weights.get_sharded(name, dim=0)
    return Embedding(weight, weights.rank * weight.shape[0], weights.world_size)


@dataclass
class LMHead:
    weight: torch.Tensor  # [vocab / world, hidden]
    world_size: int

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self.weight)
        if self.world_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.all_gather(parts, logits)
        return torch.cat(parts, dim=-1)


def load_lm_head(weights: Weights, name: str, tied_name: str) -> LMHead:
    source = name if weights.has(name) else tied_name
    vocab = weights.get_tensor(source) if weights.world_size == 1 else None
    if vocab is not None:
        return LMHead(vocab, 1)
    return LMHead(weights.get_sharded(source, dim=0), weights.world_size)
