"""Architecture registry: config.model_type → model class."""

from __future__ import annotations

from transformers import PretrainedConfig

from tgserve.shard.models.base import CausalLM
from tgserve.shard.models.gemma import GemmaForCausalLM
from tgserve.shard.models.gpt2 import GPT2LMHeadModel
from tgserve.shard.models.llama import LlamaForCausalLM
from tgserve.shard.models.mistral import MistralForCausalLM
from tgserve.shard.models.qwen2 import Qwen2ForCausalLM
from tgserve.shard.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "gemma": GemmaForCausalLM,
    "gpt2": GPT2LMHeadModel,
}


class UnsupportedModelError(ValueError):
    pass


def model_class(config: PretrainedConfig) -> type[CausalLM]:
    model_type = getattr(config, "model_type", None)
    if model_type not in MODELS:
        raise UnsupportedModelError(
            f"Unsupported model type {model_type!r}; supported: {', '.join(sorted(MODELS))}"
        )
    return MODELS[model_type]
