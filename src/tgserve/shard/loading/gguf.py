"""Dequantizes a GGUF file into dense tensors under Hugging Face parameter names."""

from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig

log = logging.getLogger(__name__)


def dequantize_to_file(
    gguf_file: Path, config_folder: Path, dtype: torch.dtype, out: Path
) -> None:
    """`load_gguf_tensors` into a safetensors file, for a child process to run.

    The dequantization imports transformers' modeling code (which would stay resident) and peaks
    at twice the model's size; in a child process neither outlives the load, and the shard reads
    the result like any checkpoint.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(config_folder))
    save_file(load_gguf_tensors(gguf_file, config, dtype), str(out))


def load_gguf_tensors(
    gguf_file: Path, config: PretrainedConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every tensor of `gguf_file`, dequantized to `dtype`, named as in the transformers model.

    The name mapping comes from a transformers model built on the meta device (no memory), and
    transformers' GGUF processors undo llama.cpp's layout changes (e.g. the q/k row permutation of
    llama, which llama.cpp applies for its interleaved RoPE). A tied lm_head is not in the file, so
    it is absent here too.
    """
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    start = time.perf_counter()
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    kwargs: dict[str, object] = {"return_tensors": True, "model_to_load": skeleton}
    # Older transformers cannot cast while reading; casting afterwards needs a float32 copy at peak.
    casts_while_reading = "torch_dtype" in inspect.signature(load_gguf_checkpoint).parameters
    if casts_while_reading:
        kwargs["torch_dtype"] = dtype
    tensors: dict[str, torch.Tensor] = load_gguf_checkpoint(str(gguf_file), **kwargs)["tensors"]
    if not casts_while_reading:
        tensors = {name: t.to(dtype) for name, t in tensors.items()}
    if not tensors:
        raise ValueError(f"{gguf_file}: no tensor matched a parameter of {type(skeleton).__name__}")
    log.info(
        "dequantized %d tensors from %s to %s in %.1fs",
        len(tensors),
        gguf_file.name,
        dtype,
        time.perf_counter() - start,
    )
    return tensors
