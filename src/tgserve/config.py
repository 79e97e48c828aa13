"""The one configuration: TGI's launcher flags, typed and frozen, handed to every process."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Who reads a flag: each reader's package must read `config.<field>` (tests/unit/test_config.py).
LAUNCHER, ROUTER, SHARD = "launcher", "router", "shard"

# float16 halves the cache's memory and the bytes decode attention reads; the CPU kernels widen
# it to float32 as they load it (llama.cpp's default cache type is f16 too).
KV_CACHE_DTYPES = ("float16", "bfloat16", "float32")

QUANTIZE_METHODS = (
    "awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes",
    "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8",
)

# What the router asks warmup for when the flags are unset: TGI's defaults. Warmup answers what
# fits, and the start-up table shows the result.
WARMUP_PREFILL_TOKENS = 4096
WARMUP_BATCH_TOTAL_TOKENS = 16000

# TGI's default --shard-uds-path. TGI uses it as it is, so two servers on one host share their
# shards' sockets; tgserve appends the router's port (default_shard_uds_path).
SHARD_UDS_PREFIX = "/tmp/text-generation-server"


class ConfigError(ValueError):
    """A flag value that cannot be served; the launcher exits with this message."""


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:  # NaN included
            raise ValueError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 1073741824, 1GiB, 512MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class Flag:
    """How a Config field is set on the command line, and what happens to it.

    Exactly one of: `used_by` (the processes that read it), `refused` (any value but the default
    stops the launcher with a message: tgserve cannot serve it yet), `notice` (accepted for TGI
    compatibility; the launcher says at start why it changes nothing).
    """

    help: str
    parse: Callable[[str], Any] | None = str  # None: a switch
    used_by: tuple[str, ...] = ()
    refused: bool = False
    notice: str | None = None
    repeatable: bool = False


def _flag(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"flag": Flag(help, **kw)})


@dataclass(frozen=True)
class Config:
    """Defaults equal TGI's launcher defaults (its --port 3000 included)."""

    # -- the model -----------------------------------------------------------------------------
    model_id: str | None = _flag(
        None, "Local folder, hub id, .gguf file; unset: the packaged SmolLM2-135M-Instruct",
        used_by=(LAUNCHER,))
    revision: str | None = _flag(None, "Hub revision (branch, tag or commit)", used_by=(LAUNCHER,))
    huggingface_hub_cache: str | None = _flag(
        None, "Hugging Face hub cache folder", used_by=(LAUNCHER,))
    weights_cache_override: str | None = _flag(
        None, "Folder that overrides the hub lookup", used_by=(LAUNCHER,))
    convert_pickle_weights: bool = _flag(
        False, "Convert .bin checkpoints to safetensors", parse=None, used_by=(LAUNCHER,))
    trust_remote_code: bool = _flag(
        False, "Accepted for compatibility; tgserve runs no hub code", parse=None,
        notice="tgserve runs its own model code, never code from the hub")
    dtype: str | None = _flag(
        None, "float32, float16 or bfloat16 (default: float32 on CPU)", used_by=(SHARD,))
    kv_cache_dtype: str | None = _flag(
        None, "KV cache dtype: float16, bfloat16 or float32 (default: the model dtype)",
        used_by=(SHARD,))
    quantize: str | None = _flag(None, "Quantization method (not implemented yet)", refused=True)
    speculate: int | None = _flag(
        None, "Speculative tokens per step (not implemented yet)", parse=int, refused=True)
    rope_scaling: str | None = _flag(None, "linear or dynamic (not implemented yet)", refused=True)
    rope_factor: float | None = _flag(
        None, "RoPE scaling factor (not implemented yet)", parse=float, refused=True)
    lora_adapters: str | None = _flag(None, "LoRA adapters (not implemented yet)", refused=True)

    # -- shards --------------------------------------------------------------------------------
    sharded: bool | None = _flag(
        None, "Shard the model across devices", parse=parse_bool, used_by=(LAUNCHER,))
    num_shard: int | None = _flag(
        None, "Tensor-parallel shards (processes)", parse=positive(int), used_by=(LAUNCHER,))
    shard_uds_path: str | None = _flag(
        None, f"Shard unix socket prefix (unset: {SHARD_UDS_PREFIX}-3000 for --port 3000)",
        used_by=(LAUNCHER, ROUTER, SHARD))
    master_addr: str = _flag("localhost", "torch.distributed address", used_by=(SHARD,))
    master_port: int | None = _flag(
        None, "torch.distributed port (unset: a free port, one per server)", parse=int,
        used_by=(LAUNCHER, SHARD))
    cuda_memory_fraction: float = _flag(
        1.0, "Share of device memory the shards may use", parse=float, used_by=(SHARD,))
    cuda_graphs: str | None = _flag(
        None, "Accepted for compatibility (no CUDA graphs yet)",
        notice="tgserve captures no CUDA graphs yet")
    disable_custom_kernels: bool = _flag(
        False, "Run torch's ops instead of tgserve's C++ kernels", parse=None, used_by=(SHARD,))
    kv_cache_memory: int | None = _flag(
        None, "Bytes of KV cache per shard, e.g. 1GiB (default: auto)", parse=parse_bytes,
        used_by=(SHARD,))
    threads: int = _flag(0, "torch threads per shard (0: one per core)", parse=int,
                         used_by=(SHARD,))
    watermark_gamma: float = _flag(
        0.5, "Watermark green-list share", parse=float, used_by=(SHARD,))
    watermark_delta: float = _flag(2.0, "Watermark bias", parse=float, used_by=(SHARD,))
    shard_ready_timeout: int = _flag(
        600, "Seconds to wait for shards to load and warm up", parse=int, used_by=(LAUNCHER,))

    # -- limits and batching -------------------------------------------------------------------
    max_concurrent_requests: int = _flag(
        128, "Over this, requests get 429", parse=positive(int), used_by=(ROUTER,))
    max_best_of: int = _flag(2, "Upper bound of best_of", parse=int, used_by=(ROUTER,))
    max_stop_sequences: int = _flag(
        4, "Upper bound of stop sequences per request", parse=int, used_by=(ROUTER,))
    max_top_n_tokens: int = _flag(
        5, "Upper bound of top_n_tokens", parse=int, used_by=(ROUTER,))
    max_input_tokens: int | None = _flag(
        None, "Max prompt tokens (default: from warmup)", parse=positive(int), used_by=(ROUTER,))
    max_input_length: int | None = _flag(
        None, "Legacy alias of --max-input-tokens", parse=positive(int), used_by=(LAUNCHER,))
    max_total_tokens: int | None = _flag(
        None, "Max prompt + new tokens (default: from warmup)", parse=positive(int),
        used_by=(ROUTER,))
    waiting_served_ratio: float = _flag(
        0.3, "Waiting/running ratio that triggers a prefill", parse=float, used_by=(ROUTER,))
    max_batch_prefill_tokens: int | None = _flag(
        None, "Token budget of one prefill", parse=positive(int), used_by=(ROUTER,))
    max_batch_total_tokens: int | None = _flag(
        None, "KV tokens of a batch (default: from warmup)", parse=positive(int),
        used_by=(ROUTER,))
    max_waiting_tokens: int = _flag(
        20, "Decode steps before waiting requests are forced in", parse=int, used_by=(ROUTER,))
    max_batch_size: int | None = _flag(
        None, "Hard cap on requests per batch", parse=positive(int), used_by=(ROUTER,))
    max_step_prefill_tokens: int = _flag(
        256, "Prompt tokens admitted per step while others decode (time to first token vs. "
        "latency)", parse=positive(int), used_by=(ROUTER,))
    max_client_batch_size: int = _flag(
        4, "Max prompts in one /v1/completions request", parse=positive(int), used_by=(ROUTER,))
    payload_limit: int = _flag(
        2_000_000, "Request body limit in bytes (413 over it)", parse=positive(int),
        used_by=(ROUTER,))
    validation_workers: int = _flag(
        2, "Tokenizer threads in the router", parse=positive(int), used_by=(ROUTER,))
    enable_prefill_logprobs: bool = _flag(
        False, "Accepted for compatibility: prompt log-probabilities are always available",
        parse=None, notice="prompt log-probabilities are always available on request")

    # -- HTTP ----------------------------------------------------------------------------------
    hostname: str = _flag("0.0.0.0", "Router bind address", used_by=(ROUTER,))
    port: int = _flag(3000, "Router HTTP port", parse=int, used_by=(ROUTER,))
    prometheus_port: int = _flag(9000, "Extra Prometheus listener port", parse=int,
                                 used_by=(ROUTER,))
    cors_allow_origin: tuple[str, ...] = _flag(
        (), "Allowed CORS origin (repeatable; none: any)", repeatable=True, used_by=(ROUTER,))
    api_key: str | None = _flag(
        None, "Require `Authorization: Bearer <key>` on generation routes", used_by=(ROUTER,))
    tokenizer_config_path: str | None = _flag(
        None, "tokenizer_config.json overriding the model's", used_by=(ROUTER,))
    request_timeout: float | None = _flag(
        None, "Seconds a request may wait for its first token, unless its X-Request-Timeout "
        "header says otherwise; one that cannot make it gets 429 + Retry-After at once "
        "(default: no limit)", parse=positive(float), used_by=(ROUTER,))
    cache_salt_from_api_key: bool = _flag(
        False, "Share cached prompt blocks only between requests with the same "
        "`Authorization` token (tenants behind a gateway)", parse=None, used_by=(ROUTER,))
    disable_grammar_support: bool = _flag(
        False, "Refuse grammar/tools/response_format", parse=None, used_by=(ROUTER,))
    graceful_termination_timeout: int = _flag(
        90, "Seconds in-flight requests get on SIGTERM", parse=int, used_by=(LAUNCHER, ROUTER))
    usage_stats: str = _flag(
        "off", "Accepted for compatibility; tgserve sends no telemetry",
        notice="tgserve sends no usage statistics")

    # -- observability -------------------------------------------------------------------------
    json_output: bool = _flag(
        False, "JSON log lines", parse=None, used_by=(LAUNCHER, ROUTER, SHARD))
    otlp_endpoint: str | None = _flag(
        None, "OpenTelemetry OTLP/gRPC endpoint", used_by=(ROUTER, SHARD))
    otlp_service_name: str = _flag(
        "text-generation-inference.router", "OpenTelemetry service name", used_by=(ROUTER, SHARD))
    log_prompts: bool = _flag(
        False, "Log prompts and generated text (never logged otherwise)", parse=None,
        used_by=(ROUTER,))

    # -- resolved by the launcher before it starts the children (no flags) ----------------------
    model_name: str = ""  # what the API reports as the model (the id, or the packaged default's)
    model_path: str | None = None  # config.json + tokenizer (+ safetensors unless gguf_file)
    gguf_file: str | None = None
    world_size: int = 1

    # -- derived values --------------------------------------------------------------------------

    def shard_socket(self, rank: int) -> str:
        assert self.shard_uds_path is not None, "the launcher resolves --shard-uds-path first"
        return f"{self.shard_uds_path}-{rank}"

    @property
    def shard_service_name(self) -> str:
        """TGI's naming: `….router` for the router, `….server` for the shards."""
        return self.otlp_service_name.removesuffix(".router") + ".server"

    def notices(self) -> list[str]:
        """One line per compatibility flag set to something other than its default."""
        return [
            f"--{f.name.replace('_', '-')} changes nothing: {meta.notice}"
            for f, meta in flag_fields()
            if meta.notice is not None and getattr(self, f.name) != f.default
        ]

    def check(self) -> None:
        """Refuses what cannot be served, naming the flag; the launcher calls it once."""
        if self.max_input_length is not None and self.max_input_tokens is not None:
            raise ConfigError("--max-input-tokens and --max-input-length cannot both be set")
        inputs = self.max_input_tokens or self.max_input_length
        if inputs is not None and self.max_total_tokens is not None and (
            inputs >= self.max_total_tokens
        ):
            raise ConfigError(
                f"`max_input_tokens`({inputs}) must be < "
                f"`max_total_tokens`({self.max_total_tokens})"
            )
        if self.kv_cache_dtype is not None and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            # TGI's fp8_e4m3fn / fp8_e5m2 included: refused rather than served in another dtype.
            raise ConfigError(
                f"--kv-cache-dtype {self.kv_cache_dtype!r} is not implemented in tgserve; "
                f"one of: {', '.join(KV_CACHE_DTYPES)}"
            )
        if self.quantize is not None and self.quantize not in QUANTIZE_METHODS:
            raise ConfigError(
                f"--quantize {self.quantize!r} is not a method; "
                f"one of: {', '.join(QUANTIZE_METHODS)}"
            )
        if not 0.0 < self.watermark_gamma < 1.0:
            raise ConfigError(f"--watermark-gamma must be in (0, 1), got {self.watermark_gamma}")
        for f, meta in flag_fields():
            value = getattr(self, f.name)
            if meta.refused and value is not None and value != f.default:
                # Refuse rather than run without what the user asked for.
                raise ConfigError(f"--{f.name.replace('_', '-')} is not implemented yet in tgserve")

    # -- the wire between processes ---------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Config:
        data = json.loads(text)
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(known)
        if unknown:
            raise ConfigError(f"unknown configuration fields: {sorted(unknown)}")
        for name, value in data.items():
            if isinstance(known[name].default, tuple):
                data[name] = tuple(value)
        return cls(**data)


def default_shard_uds_path(port: int) -> str:
    """The socket prefix of a server started without --shard-uds-path.

    Derived from the router's port, not the process id: two live routers on a host rarely share
    a port (only on different --hostname addresses, and then the second finds the first's
    sockets answering and stops), and a restart on the same port removes what a crashed run of
    itself left instead of leaving one more file per run in /tmp.
    """
    return f"{SHARD_UDS_PREFIX}-{port}"


def flag_fields() -> list[tuple[dataclasses.Field[Any], Flag]]:
    """Every Config field that is a launcher flag, in declaration order."""
    return [(f, f.metadata["flag"]) for f in dataclasses.fields(Config) if "flag" in f.metadata]
