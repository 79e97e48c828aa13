"""Llama family (Llama 2/3, Code Llama, SmolLM2, TinyLlama): RMSNorm, RoPE, GQA, SwiGLU."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from tgserve.shard.kernels import decode_layer, fused
from tgserve.shard.kv_cache import KVCache
from tgserve.shard.layers.attention import AttentionMetadata, get_backend
from tgserve.shard.layers.embedding import Embedding, LMHead, load_embedding, load_lm_head
from tgserve.shard.layers.fused import cpu_kernels_fit, cpu_kernels_fit_cache
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
        qkv = self.qkv(x)
        keys, values = kv_cache.keys[self.layer], kv_cache.values[self.layer]
        stored = (
            cos.shape[-1] == d.head_dim
            and cpu_kernels_fit(qkv, cos)
            and cpu_kernels_fit_cache(keys)
        )
        if stored:  # RoPE in place and the KV write, in one pass
            fused.rotary_store_kv(
                qkv, cos.view(-1, d.head_dim), sin.view(-1, d.head_dim), keys, values,
                meta.slots, d.num_heads, d.num_kv_heads, d.head_dim,
            )  # fmt: skip
        q, k, v = qkv.split([d.q_size, d.kv_size, d.kv_size], dim=-1)
        q = q.view(-1, d.num_heads, d.head_dim)  # [T, H, D]
        k = k.view(-1, d.num_kv_heads, d.head_dim)  # [T, Hkv, D]
        v = v.view(-1, d.num_kv_heads, d.head_dim)
        if not stored:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attend = get_backend(self.backend_name)
        o = attend(
            q, k, v, kv_cache, self.layer, meta, d.head_dim**-0.5, self.window, kv_stored=stored
        )
        return self.o(o.reshape(-1, d.q_size))


@dataclass
class LlamaLayer:
    input_norm: RMSNorm
    attention: LlamaAttention
    post_norm: RMSNorm
    mlp: GatedMLP
    # Decode steps run the whole layer as one C++ op (decode_layer.cpp: the same kernels in the
    # same order, without a Python round trip per op) when every piece of it has a CPU kernel.
    fused_decode: bool = field(init=False)

    def __post_init__(self) -> None:
        a, m = self.attention, self.mlp
        linears = (a.qkv, a.o.linear, m.gate_up, m.down.linear)
        self.fused_decode = (
            a.backend_name == "sdpa"
            and a.o.world_size == m.down.world_size == 1
            and m.act is F.silu
            and self.input_norm.eps == self.post_norm.eps
            and all(linear.packed is not None for linear in linears)
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
        d = self.attention.dims
        if (
            self.fused_decode
            and meta.prefill is None
            and cos.shape[-1] == d.head_dim
            and cpu_kernels_fit(hidden)
            and cpu_kernels_fit_cache(kv_cache.keys[self.attention.layer])
        ):
            hidden, residual = self._decode(hidden, residual, cos, sin, kv_cache, meta)
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, m, d = self.attention, self.mlp, self.attention.dims
        o, down = a.o.linear, m.down.linear
        return decode_layer.llama_decode_layer(
            hidden, residual, self.input_norm.weight, self.post_norm.weight, self.input_norm.eps,
            a.qkv.packed, a.qkv.bias, o.packed, o.bias, m.gate_up.packed, m.gate_up.bias,
            down.packed, down.bias, m.gate_up.out_features // 2,
            cos.view(-1, d.head_dim), sin.view(-1, d.head_dim),
            kv_cache.keys[a.layer], kv_cache.values[a.layer], meta.slots, meta.kv_index,
            meta.kv_lengths, d.num_heads, d.num_kv_heads, d.head_dim, a.window or 0,
            d.head_dim**-0.5,
        )  # fmt: skip


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
        self.lm_head: LMHead = load_lm_head(
            weights, "lm_head.weight", "model.embed_tokens.weight", self.embed
        )

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
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden = self.embed(input_ids)
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
