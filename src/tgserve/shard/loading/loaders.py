"""Build a model from a Hugging Face folder or a GGUF file, straight into the serving dtype."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from tgserve.isolated import in_child_process
from tgserve.shard.kernels import KernelOps, select_ops
from tgserve.shard.loading.gguf import dequantize_to_file
from tgserve.shard.loading.weights import Weights, safetensors_files
from tgserve.shard.models.base import CausalLM
from tgserve.shard.models.registry import model_class

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str | None, config: PretrainedConfig, device: torch.device) -> torch.dtype:
    if name:
        if name not in DTYPES:
            raise ValueError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu":
        # Half precision matmuls are slow on CPUs without AMX/AVX-512-BF16: float32 is the fast
        # path.
        return torch.float32
    configured = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return configured if isinstance(configured, torch.dtype) else torch.float16


def load_config(path: Path) -> PretrainedConfig:
    return AutoConfig.from_pretrained(str(path))


def load_model(
    path: Path,
    device: torch.device,
    dtype: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    gguf_file: Path | None = None,
    kernels: KernelOps | None = None,
) -> CausalLM:
    """`path` holds config.json (and, unless `gguf_file` is given, the safetensors weights).
    `kernels`: the ops every layer calls; by default the best for `device` (select_ops), which
    on a CPU builds or loads the C++ kernels here, before any request."""
    config = load_config(path)
    cls = model_class(config)  # fail on an unsupported architecture before reading any weight
    torch_dtype = resolve_dtype(dtype, config, device)
    if kernels is None:
        kernels = select_ops(device)
    start = time.perf_counter()
    with contextlib.ExitStack() as scratch:
        if gguf_file is not None:
            folder = Path(scratch.enter_context(tempfile.TemporaryDirectory(
                prefix=".dequantized-", dir=path if os.access(path, os.W_OK) else None)))
            files = [folder / "w.safetensors"]
            in_child_process(dequantize_to_file, gguf_file, path, torch_dtype, files[0])
        else:
            _refuse_pickle(path)
            files = safetensors_files(path)
        weights = Weights(files, torch_dtype, device, rank, world_size)
        with torch.inference_mode():
            model = cls(config, weights, kernels)
        weights.close()
    log.info("loaded %s (%s) in %.1fs", config.model_type, torch_dtype, time.perf_counter() - start)
    return model


def _refuse_pickle(path: Path) -> None:
    if not list(path.glob("*.safetensors")) and list(path.glob("*.bin")):
        raise ValueError(
            f"{path} only has pickle (.bin) weights, which can run arbitrary code when loaded; "
            "convert them to safetensors with --convert-pickle-weights"
        )
