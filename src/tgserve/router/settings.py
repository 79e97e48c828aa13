"""The router's HTTP settings: a frozen value resolved once by the launcher/CLI."""

from __future__ import annotations

from dataclasses import dataclass

from tgserve.router.native.validation import Limits
from tgserve.router.terms import TermsPolicy


@dataclass(frozen=True)
class RouterSettings:
    """Defaults are TGI's launcher defaults; token limits are normally resolved from warmup."""

    hostname: str = "0.0.0.0"
    port: int = 3000
    api_key: str | None = None
    cors_allow_origin: tuple[str, ...] = ()  # empty means any origin
    payload_limit: int = 2_000_000
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int = 4095
    max_total_tokens: int = 4096
    max_client_batch_size: int = 4
    validation_workers: int = 2
    model_id: str = ""
    compute_type: str = "gpu+optimized"  # x-compute-type header; TGI reads env COMPUTE_TYPE
    grammar_support: bool = True
    request_timeout: float | None = None
    cache_salt_from_api_key: bool = False

    def terms(self) -> TermsPolicy:
        return TermsPolicy(self.request_timeout, self.cache_salt_from_api_key)

    def limits(self) -> Limits:
        return Limits(
            max_best_of=self.max_best_of,
            max_stop_sequences=self.max_stop_sequences,
            max_top_n_tokens=self.max_top_n_tokens,
            max_input_tokens=self.max_input_tokens,
            max_total_tokens=self.max_total_tokens,
            grammar_support=self.grammar_support,
        )
