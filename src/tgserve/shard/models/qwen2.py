"""Qwen2: the Llama block with biases on q/k/v (not on o) and an opt-in sliding window."""

from __future__ import annotations

from transformers import PretrainedConfig

from tgserve.shard.models.llama import LlamaForCausalLM, LlamaVariant


def window(config: PretrainedConfig) -> int | None:
    if not getattr(config, "use_sliding_window", False):
        return None
    # Qwen2 windows only the layers from max_window_layers on; a uniform window is all we support.
    if getattr(config, "max_window_layers", 0) not in (0, None):
        raise ValueError(f"{config.model_type} with per-layer sliding windows is not supported")
    return getattr(config, "sliding_window", None)


class Qwen2ForCausalLM(LlamaForCausalLM):
    def variant_for(self, config: PretrainedConfig) -> LlamaVariant:
        return LlamaVariant(qkv_bias=True, sliding_window=window(config))

    @property
    def slidingwindow(self) -> int | None:
        return window(self.config)
