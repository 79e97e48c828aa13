"""Per-request sampling and stopping parameters, decoded once from the gRPC request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Watermark:
    """The server's watermark (--watermark-gamma, --watermark-delta); requests only switch it on.

    TGI's defaults: half the vocabulary is green, and green tokens gain 2.0 in logit.
    """

    gamma: float = 0.5
    delta: float = 2.0


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    additive_frequency_penalty: float = 0.0  # OpenAI's: per occurrence in the generated tokens
    watermark: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)

    @property
    def sampling(self) -> bool:
        # TGI forces sampling whenever a warper is active, whatever do_sample says.
        return (
            self.do_sample
            or self.temperature != 1.0
            or self.top_k != 0
            or self.top_p < 1.0
            or self.typical_p < 1.0
        )

    @classmethod
    def from_pb(cls, pb: Any) -> SamplingParams:
        return cls(
            temperature=pb.temperature if pb.temperature > 0 else 1.0,
            top_k=int(pb.top_k),
            top_p=pb.top_p if 0 < pb.top_p else 1.0,
            typical_p=pb.typical_p if 0 < pb.typical_p else 1.0,
            do_sample=bool(pb.do_sample),
            seed=int(pb.seed),
            repetition_penalty=pb.repetition_penalty if pb.repetition_penalty > 0 else 1.0,
            frequency_penalty=float(pb.frequency_penalty),
            presence_penalty=float(pb.presence_penalty),
            additive_frequency_penalty=float(pb.additive_frequency_penalty),
            watermark=bool(pb.watermark),
            logit_bias={int(k): float(v) for k, v in pb.logit_bias.items()},
        )


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int = 20
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False

    @classmethod
    def from_pb(cls, pb: Any) -> StoppingParams:
        return cls(
            max_new_tokens=int(pb.max_new_tokens),
            stop_sequences=tuple(pb.stop_sequences),
            ignore_eos=bool(pb.ignore_eos_token),
        )
