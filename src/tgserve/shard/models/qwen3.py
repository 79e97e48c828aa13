"""Qwen3: the Qwen2 block without the q/k/v biases, with an RMSNorm on each q and k head."""

from __future__ import annotations

from dataclasses import replace

from transformers import PretrainedConfig

from tgserve.shard.models.llama import LlamaForCausalLM, LlamaVariant
from tgserve.shard.models.qwen2 import window


class Qwen3ForCausalLM(LlamaForCausalLM):
    def variant_for(self, config: PretrainedConfig) -> LlamaVariant:
        # Biases as Llama's (attention_bias, off in the released checkpoints); head_dim is the
        # config's own, not hidden_size / heads (ModelDims).
        return replace(super().variant_for(config), qk_norm=True, sliding_window=window(config))

    @property
    def sliding_window(self) -> int | None:
        return window(self.config)
