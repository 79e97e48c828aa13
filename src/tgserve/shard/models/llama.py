"""Llama family (Llama 2/3, Code Llama, SmolLM2, TinyLlama): RMSNorm, RoPE, GQA, SwiGLU."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig

from tgserve.shard.kv_cache import KVCache
from tgserve.shard.layers.attention import AttentionMetadata, get_backend
from tgserve.shard.layers.embedding import Embedding, LMHead, load_embedding, load_lm_head
from tgserve.shard.layers.linear import Linear, RowLinear, load_column, load_row
from tgserve.shard.layers.mlp import GatedMLP, load_gated_mlp
from tgserve.shard.layers.norm import RMSNorm, load_rms_norm
from tgserve.shard.layers.rotary import RotaryEmbedding, apply_rotary
from tgserve.shard.loading.weights import Weights
from tgserve.shard.models.base import CausalLM, ModelDims


@dataclass(frozen=True)
class LlamaVariant:
    """What separates the Llama-shaped families from one another."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None


@dataclass
class LlamaAttention:
    qkv: Linear
    o: RowLinear
    dims: ModelDims
    layer: int
    window: int | None
    backend_name: str

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        d = self.dims
        q, k, v = self.qkv(x).split([d.q_size, d.kv_size, d.kv_size], dim=-1)
        q = apply_rotary(q.view(-1, d.num_heads, d.head_dim), cos, sin)  # [T, H, D]
        k = apply_rotary(k.view(-1, d.num_kv_heads, d.head_dim), cos, sin)  # [T, Hkv, D]
        v = v.view(-1, d.num_kv_heads, d.head_dim)
        attend = get_backend(self.backend_name)
        o = attend(q, k, v, kv_cache, self.layer, meta, d.head_dim**-0.5, self.window)
        return self.o(o.reshape(-1, d.q_size))


@dataclass
class LlamaLayer:
    input_norm: RMSNorm
    attention: LlamaAttention
    post_norm: RMSNorm
    mlp: GatedMLP

    def __call__(self, x, cos, sin, kv_cache, meta):  # type: ignore[no-untyped-def]
        x = x + self.attention(self.input_norm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_norm(x))


class LlamaForCausalLM(CausalLM):
    variant = LlamaVariant()

    def __init__(self, config: PretrainedConfig, weights: Weights, attention: str = "sdpa") -> None:
        super().__init__(config, weights)
        variant = self.variant_for(config)
        eps = config.rms_norm_eps
        self.embed: Embedding = load_embedding(weights, "model.embed_tokens.weight")
        self.rotary = RotaryEmbedding.from_config(config, self.dims.head_dim, weights.device)
        self.layers = [
            self._load_layer(weights, i, variant, attention, eps) for i in range(self.dims.num_layers)
        ]
        self.norm = load_rms_norm(weights, "model.norm", eps)
        self.lm_head: LMHead = load_lm_head(weights, "lm_head.weight", "model.embed_tokens.weight")

    def variant_for(self, config: PretrainedConfig) -> LlamaVariant:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaVariant(
            qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False))
        )

    def _load_layer(
        self, weights: Weights, i: int, variant: LlamaVariant, attention: str, eps: float
    ) -> LlamaLayer:
        p = f"model.layers.{i}"
        qkv = load_column(
            weights, [f"{p}.self_attn.{n}_proj" for n in "qkv"], bias=variant.qkv_bias
        )
        o = load_row(weights, f"{p}.self_attn.o_proj", bias=variant.o_bias)
        attn = LlamaAttention(qkv, o, self.dims, i, variant.sliding_window, attention)
        mlp = load_gated_mlp(weights, f"{p}.mlp", self.config.hidden_act, variant.mlp_bias)
        return LlamaLayer(
            load_rms_norm(weights, f"{p}.input_layernorm", eps),
            attn,
            load_rms_norm(weights, f"{p}.post_attention_layernorm", eps),
            mlp,
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache, meta)
        return self.norm(x)
