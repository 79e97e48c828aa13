"""What every architecture shows the generator: dimensions, a forward, logits at chosen rows."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from tgserve.shard.kernels import KernelOps
from tgserve.shard.kv_cache import KVCache
from tgserve.shard.layers.attention import AttentionMetadata
from tgserve.shard.layers.embedding import LMHead
from tgserve.shard.loading.weights import Weights


@dataclass(frozen=True)
class ModelDims:
    """Per-rank attention dimensions (heads are split across tensor-parallel ranks)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: PretrainedConfig, world_size: int) -> ModelDims:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        if heads % world_size or kv_heads % world_size:
            raise ValueError(
                f"{heads} attention heads and {kv_heads} KV heads cannot be split over "
                f"{world_size} shards; choose --num-shard dividing both"
            )
        return cls(
            num_layers=config.num_hidden_layers,
            num_heads=heads // world_size,
            num_kv_heads=kv_heads // world_size,
            head_dim=head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
        )


class CausalLM(ABC):
    """Base of the architectures: subclasses build layers and implement `hidden_states`."""

    lm_head: LMHead

    def __init__(self, config: PretrainedConfig, weights: Weights, kernels: KernelOps) -> None:
        self.config = config
        self.kernels = kernels  # what every layer calls; the sampler's greedy choice too
        self.dtype = weights.dtype
        self.device = weights.device
        self.dims = ModelDims.from_config(config, weights.world_size)

    @property
    def sliding_window(self) -> int | None:
        return None

    @abstractmethod
    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states [T, hidden] of the flattened new tokens, or [R, hidden] of
        only their `rows`: past the last layer's attention no token reads another, so that
        layer's output projection and MLP run on those rows alone (a prompt needs its last
        token's logits only: for a prefill of 180-token prompts, 1/30 of its FLOPs)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [R, V] in float32 for the rows `logit_rows` of the flat tokens (all if None)."""
        hidden = self.hidden_states(input_ids, positions, kv_cache, meta, logit_rows)
        return self.lm_head(hidden).float()
