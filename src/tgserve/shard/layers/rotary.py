"""Rotary position embeddings: frequencies from the config (any HF rope type), cos/sin a forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _rope_parameters(config: PretrainedConfig) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


@dataclass
class RotaryEmbedding:
    inv_freq: torch.Tensor  # [rotary_dim / 2] float32
    scaling: float

    @classmethod
    def from_config(
        cls, config: PretrainedConfig, head_dim: int, device: torch.device
    ) -> RotaryEmbedding:
        params = _rope_parameters(config)
        rope_type = params["rope_type"]
        if rope_type == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim
            inv_freq = 1.0 / (params["rope_theta"] ** exponents)
            return cls(inv_freq.to(device), 1.0)
        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ValueError(f"unsupported rope type {rope_type!r}")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, device)
        return cls(inv_freq.float().to(device), float(scaling))

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, 1, D] for positions [T]; computed once a forward, shared by all layers."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scaling).to(dtype)
        sin = (emb.sin() * self.scaling).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)
