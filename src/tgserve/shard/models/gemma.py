"""Gemma (1): the Llama block with (1 + w) RMSNorms, scaled embeddings and a GeGLU MLP."""

from __future__ import annotations

from dataclasses import replace

from transformers import PretrainedConfig

from tgserve.shard.models.llama import LlamaForCausalLM, LlamaVariant


def activation_name(config: PretrainedConfig) -> str:
    """The gated MLP's activation: tanh-approximate GELU in every released checkpoint.

    Their configs say `hidden_act: "gelu"`, which the reference reads as the tanh approximation
    (older transformers read `hidden_activation` instead, defaulting to it); the exact GELU would
    shift every logit.
    """
    name = getattr(config, "hidden_activation", None) or config.hidden_act
    return "gelu_pytorch_tanh" if name == "gelu" else name


class GemmaForCausalLM(LlamaForCausalLM):
    def variant_for(self, config: PretrainedConfig) -> LlamaVariant:
        # The LM head is tied to the embeddings (load_lm_head finds no lm_head.weight); head_dim
        # (256 in the released models) is the config's own.
        return replace(
            super().variant_for(config),
            norm_offset=1.0,
            scale_embeddings=True,
            act=activation_name(config),
        )
