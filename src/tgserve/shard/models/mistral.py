"""Mistral: the Llama block with an optional sliding attention window."""

from __future__ import annotations

from transformers import PretrainedConfig

from tgserve.shard.models.llama import LlamaForCausalLM, LlamaVariant


class MistralForCausalLM(LlamaForCausalLM):
    def variant_for(self, config: PretrainedConfig) -> LlamaVariant:
        return LlamaVariant(sliding_window=getattr(config, "sliding_window", None))

    @property
    def sliding_window(self) -> int | None:
        return getattr(self.config, "sliding_window", None)
