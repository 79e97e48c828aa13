"""GPT-2: learned positions, LayerNorm, fused Conv1D q/k/v (weights stored [in, out])."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from tgserve.shard.kernels import KernelOps
from tgserve.shard.kv_cache import KVCache
from tgserve.shard.layers.attention import AttentionMetadata, paged_attention
from tgserve.shard.layers.embedding import load_embedding, load_lm_head
from tgserve.shard.layers.linear import Linear, RowLinear
from tgserve.shard.layers.mlp import PlainMLP, activation
from tgserve.shard.layers.norm import LayerNorm, load_layer_norm
from tgserve.shard.loading.weights import Weights
from tgserve.shard.models.base import CausalLM, ModelDims


def _conv1d_column(weights: Weights, prefix: str, parts: int, kernels: KernelOps) -> Linear:
    """A Conv1D whose output holds `parts` equal blocks (q, k, v): each block is split by rank."""
    weight = weights.get_tensor(f"{prefix}.weight").t()  # [out, in]
    bias = weights.get_tensor(f"{prefix}.bias")
    w_blocks = [b.chunk(weights.world_size, dim=0)[weights.rank] for b in weight.chunk(parts, 0)]
    b_blocks = [b.chunk(weights.world_size, dim=0)[weights.rank] for b in bias.chunk(parts, 0)]
    return Linear.of(torch.cat(w_blocks).contiguous(), torch.cat(b_blocks).contiguous(), kernels)


def _conv1d_row(weights: Weights, prefix: str, kernels: KernelOps) -> RowLinear:
    weight = weights.get_tensor(f"{prefix}.weight").t()  # [out, in]
    part = weight.chunk(weights.world_size, dim=1)[weights.rank].contiguous()
    bias = weights.get_tensor(f"{prefix}.bias") if weights.rank == 0 else None
    return RowLinear(Linear.of(part, bias, kernels), weights.world_size)


@dataclass
class GPT2Attention:
    qkv: Linear
    o: RowLinear
    dims: ModelDims
    layer: int
    scale: float
    kernels: KernelOps

    def __call__(self, x: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
        d = self.dims
        q, k, v = self.qkv(x).split([d.q_size, d.kv_size, d.kv_size], dim=-1)
        q = q.view(-1, d.num_heads, d.head_dim)
        k = k.view(-1, d.num_kv_heads, d.head_dim)
        v = v.view(-1, d.num_kv_heads, d.head_dim)
        o = paged_attention(self.kernels, q, k, v, kv_cache, self.layer, meta, self.scale, None)
        return self.o(o.reshape(-1, d.q_size))


@dataclass
class GPT2Layer:
    ln_1: LayerNorm
    attention: GPT2Attention
    ln_2: LayerNorm
    mlp: PlainMLP

    def __call__(
        self,
        x: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """With `rows` (the last layer), only those rows go on past the attention."""
        attended = self.attention(self.ln_1(x), kv_cache, meta)
        x = x + attended if rows is None else (x + attended).index_select(0, rows)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(CausalLM):
    def __init__(self, config: PretrainedConfig, weights: Weights, kernels: KernelOps) -> None:
        super().__init__(config, weights, kernels)
        prefix = "transformer." if weights.has("transformer.wte.weight") else ""
        eps = config.layer_norm_epsilon
        self.wte = load_embedding(weights, f"{prefix}wte.weight")
        self.wpe = weights.get_tensor(f"{prefix}wpe.weight")
        scale = self.dims.head_dim**-0.5 if config.scale_attn_weights else 1.0
        act = activation(config.activation_function)
        self.layers = []
        for i in range(self.dims.num_layers):
            p = f"{prefix}h.{i}"
            attn = GPT2Attention(
                _conv1d_column(weights, f"{p}.attn.c_attn", 3, kernels),
                _conv1d_row(weights, f"{p}.attn.c_proj", kernels),
                self.dims,
                i,
                scale,
                kernels,
            )
            mlp = PlainMLP(
                _conv1d_column(weights, f"{p}.mlp.c_fc", 1, kernels),
                _conv1d_row(weights, f"{p}.mlp.c_proj", kernels),
                act,
            )
            self.layers.append(
                GPT2Layer(load_layer_norm(weights, f"{p}.ln_1", eps), attn,
                          load_layer_norm(weights, f"{p}.ln_2", eps), mlp)
            )
        self.ln_f = load_layer_norm(weights, f"{prefix}ln_f", eps)
        self.lm_head = load_lm_head(
            weights, "lm_head.weight", f"{prefix}wte.weight", kernels, self.wte
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe[positions]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache, meta, rows if i == last else None)
        if not self.layers and rows is not None:
            x = x.index_select(0, rows)
        return self.ln_f(x)
