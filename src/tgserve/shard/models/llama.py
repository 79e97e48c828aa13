"""Llama family (Llama 2/3, Code Llama, SmolLM2, TinyLlama): RMSNorm, RoPE, GQA, SwiGLU."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from tgserve.shard.kernels import KernelOps
from tgserve.shard.kv_cache import KVCache
from tgserve.shard.layers.attention import AttentionMetadata, paged_attention
from tgserve.shard.layers.embedding import Embedding, LMHead, load_embedding, load_lm_head
from tgserve.shard.layers.linear import Linear, RowLinear, load_column, load_row
from tgserve.shard.layers.mlp import GatedMLP, load_gated_mlp
from tgserve.shard.layers.norm import RMSNorm, load_rms_norm
from tgserve.shard.layers.rotary import RotaryEmbedding
from tgserve.shard.loading.weights import Weights
from tgserve.shard.models.base import CausalLM, ModelDims


@dataclass(frozen=True)
class LlamaVariant:
    """What separates the Llama-shaped families from one another."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # Per-head RMSNorm of q and k (over head_dim, one weight shared by the heads) before RoPE.
    qk_norm: bool = False
    # Every RMSNorm scales by (norm_offset + weight): Gemma's checkpoints store the scale less 1.
    norm_offset: float = 0.0
    # Token embeddings multiplied by sqrt(hidden_size), rounded to the model's dtype first.
    scale_embeddings: bool = False
    # The gated MLP's activation; None: the config's hidden_act.
    act: str | None = None


@dataclass
class LlamaAttention:
    qkv: Linear
    o: RowLinear
    dims: ModelDims
    layer: int
    window: int | None
    kernels: KernelOps
    q_norm: RMSNorm | None = None  # with k_norm: LlamaVariant.qk_norm
    k_norm: RMSNorm | None = None

    def __call__(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        d = self.dims
        keys, values = kv_cache.keys[self.layer], kv_cache.values[self.layer]
        qkv = self.qkv(x)
        if self.q_norm is not None:
            qkv = self._norm_qk(qkv)
        # q [T, H, D], k/v [T, Hkv, D]; the C++ ops also write k/v to the cache in the same pass.
        q, k, v, stored = self.kernels.rotary_qkv(
            qkv, cos, sin, keys, values, meta.slots, d.num_heads, d.num_kv_heads,
            d.head_dim,
        )  # fmt: skip
        o = paged_attention(
            self.kernels, q, k, v, kv_cache, self.layer, meta, d.head_dim**-0.5, self.window,
            kv_stored=stored,
        )  # fmt: skip
        return self.o(o.reshape(-1, d.q_size))

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """RMSNorm of each q and k head of the fused projection, written back in place."""
        assert self.q_norm is not None and self.k_norm is not None
        d = self.dims
        h, hkv, dim = d.num_heads, d.num_kv_heads, d.head_dim
        heads = qkv.view(-1, h + 2 * hkv, dim)
        # Rows of one head each, contiguous, so the norm runs as one [T·H, D] op.
        q = self.q_norm(heads[:, :h].reshape(-1, dim))
        k = self.k_norm(heads[:, h : h + hkv].reshape(-1, dim))
        heads[:, :h] = q.view(-1, h, dim)
        heads[:, h : h + hkv] = k.view(-1, hkv, dim)
        return qkv


@dataclass
class LlamaLayer:
    input_norm: RMSNorm
    attention: LlamaAttention
    post_norm: RMSNorm
    mlp: GatedMLP
    kernels: KernelOps
    # Decode steps may run the whole layer as one op (the C++ ops' decode_layer.cpp: the same
    # kernels in the same order, without a Python round trip per op) where its shape allows;
    # the op itself declines the tensors it does not take (weights not packed, another dtype).
    fused_decode: bool = field(init=False)

    def __post_init__(self) -> None:
        a, m = self.attention, self.mlp
        # The one-op layer has no q/k norm: a layer with one runs op by op.
        self.fused_decode = (
            a.o.world_size == m.down.world_size == 1
            and m.act is F.silu
            and a.q_norm is None
            and self.input_norm.eps == self.post_norm.eps
        )

    def __call__(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this block's MLP output, the residual stream before it is added): each residual add
        is fused with the norm that follows it, the last one with the model's final norm. With
        `rows` (the last layer), only those rows go on past the attention."""
        if self.fused_decode and meta.prefill is None:
            fused = self._decode(hidden, residual, cos, sin, kv_cache, meta)
            if fused is not None:
                hidden, residual = fused
                if rows is None:
                    return hidden, residual
                return hidden.index_select(0, rows), residual.index_select(0, rows)
        if residual is None:
            residual, hidden = hidden, self.input_norm(hidden)
        else:
            hidden, residual = self.input_norm.add(hidden, residual)
        hidden = self.attention(hidden, cos, sin, kv_cache, meta)
        if rows is not None:
            hidden, residual = hidden.index_select(0, rows), residual.index_select(0, rows)
        hidden, residual = self.post_norm.add(hidden, residual)
        return self.mlp(hidden), residual

    def _decode(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        a, m, d = self.attention, self.mlp, self.attention.dims
        o, down = a.o.linear, m.down.linear
        return self.kernels.llama_decode_layer(
            hidden, residual, self.input_norm.weight, self.post_norm.weight, self.input_norm.eps,
            a.qkv.packed, a.qkv.bias, o.packed, o.bias, m.gate_up.packed, m.gate_up.bias,
            down.packed, down.bias, m.gate_up.out_features // 2, cos, sin,
            kv_cache.keys[a.layer], kv_cache.values[a.layer], meta.slots, meta.kv_index,
            meta.kv_lengths, d.num_heads, d.num_kv_heads, d.head_dim, a.window or 0,
            d.head_dim**-0.5,
        )  # fmt: skip


class LlamaForCausalLM(CausalLM):
    variant = LlamaVariant()

    def __init__(self, config: PretrainedConfig, weights: Weights, kernels: KernelOps) -> None:
        super().__init__(config, weights, kernels)
        variant = self.variant_for(config)
        self.variant = variant
        eps = config.rms_norm_eps
        self.embed: Embedding = load_embedding(weights, "model.embed_tokens.weight")
        # A 0-d tensor in the model's dtype: the reference rounds sqrt(hidden) to it first.
        self.embed_scale: torch.Tensor | None = None
        if variant.scale_embeddings:
            self.embed_scale = torch.tensor(
                config.hidden_size**0.5, dtype=weights.dtype, device=weights.device
            )
        self.rotary = RotaryEmbedding.from_config(config, self.dims.head_dim, weights.device)
        self.layers = [
            self._load_layer(weights, i, variant, eps) for i in range(self.dims.num_layers)
        ]
        self.norm = load_rms_norm(weights, "model.norm", eps, kernels, variant.norm_offset)
        self.lm_head: LMHead = load_lm_head(
            weights, "lm_head.weight", "model.embed_tokens.weight", kernels, self.embed
        )

    def variant_for(self, config: PretrainedConfig) -> LlamaVariant:
        bias = bool(getattr(config, "attention_bias", False))
        return LlamaVariant(
            qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(config, "mlp_bias", False))
        )

    def _load_layer(
        self, weights: Weights, i: int, variant: LlamaVariant, eps: float
    ) -> LlamaLayer:
        p, kernels = f"model.layers.{i}", self.kernels
        qkv = load_column(
            weights, [f"{p}.self_attn.{n}_proj" for n in "qkv"], variant.qkv_bias, kernels
        )
        o = load_row(weights, f"{p}.self_attn.o_proj", variant.o_bias, kernels)
        attn = LlamaAttention(qkv, o, self.dims, i, variant.sliding_window, kernels)
        if variant.qk_norm:
            attn.q_norm = load_rms_norm(weights, f"{p}.self_attn.q_norm", eps, kernels)
            attn.k_norm = load_rms_norm(weights, f"{p}.self_attn.k_norm", eps, kernels)
        act = variant.act or self.config.hidden_act
        mlp = load_gated_mlp(weights, f"{p}.mlp", act, kernels, bias=variant.mlp_bias)
        offset = variant.norm_offset
        return LlamaLayer(
            load_rms_norm(weights, f"{p}.input_layernorm", eps, kernels, offset),
            attn,
            load_rms_norm(weights, f"{p}.post_attention_layernorm", eps, kernels, offset),
            mlp,
            kernels,
        )

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: KVCache,
        meta: AttentionMetadata,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embed(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * self.embed_scale
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        residual: torch.Tensor | None = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(
                hidden, residual, cos, sin, kv_cache, meta, rows if i == last else None
            )
        if residual is None:  # no layers
            hidden = hidden if rows is None else hidden.index_select(0, rows)
            return self.norm(hidden)
        return self.norm.add(hidden, residual)[0]
