"""The launcher's command line: TGI's flag names, environment variables and defaults."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from tgserve.env import flag_default


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


# (flag, type, default, help); type None = a boolean switch. Defaults equal TGI's, except --port
# (tgserve's quickstart serves on 8080 via `make serve`; TGI's 3000 stays the default).
FLAGS: list[tuple[str, Callable[[str], Any] | None, Any, str]] = [
    ("--model-id", str, None, "Local folder, hub id, .gguf file; unset: the packaged SmolLM2-135M-Instruct"),
    ("--revision", str, None, "Hub revision (branch, tag or commit)"),
    ("--validation-workers", _positive(int), 2, "Tokenizer threads in the router"),
    ("--sharded", _bool, None, "Shard the model across devices"),
    ("--num-shard", _positive(int), None, "Tensor-parallel shards (processes)"),
    ("--quantize", str, None, "Quantization method (validated; see README)"),
    ("--speculate", int, None, "Speculative tokens per step"),
    ("--dtype", str, None, "float32, float16 or bfloat16 (default: float32 on CPU)"),
    ("--kv-cache-dtype", str, None, "KV cache dtype: float16, bfloat16 or float32 (default: the model dtype)"),
    ("--trust-remote-code", None, False, "Accepted for compatibility; tgserve runs no hub code"),
    ("--max-concurrent-requests", _positive(int), 128, "Over this, requests get 429"),
    ("--max-best-of", int, 2, "Upper bound of best_of"),
    ("--max-stop-sequences", int, 4, "Upper bound of stop sequences per request"),
    ("--max-top-n-tokens", int, 5, "Upper bound of top_n_tokens"),
    ("--max-input-tokens", _positive(int), None, "Max prompt tokens (default: from warmup)"),
    ("--max-input-length", _positive(int), None, "Legacy alias of --max-input-tokens"),
    ("--max-total-tokens", _positive(int), None, "Max prompt + new tokens (default: from warmup)"),
    ("--waiting-served-ratio", float, 0.3, "Waiting/running ratio that triggers a prefill"),
    ("--max-batch-prefill-tokens", _positive(int), None, "Token budget of one prefill"),
    ("--max-batch-total-tokens", _positive(int), None, "KV tokens of a batch (default: from warmup)"),
    ("--max-waiting-tokens", int, 20, "Decode steps before waiting requests are forced in"),
    ("--max-batch-size", _positive(int), None, "Hard cap on requests per batch"),
    ("--cuda-graphs", str, None, "Accepted for compatibility (no CUDA graphs yet)"),
    ("--hostname", str, "0.0.0.0", "Router bind address"),
    ("--port", int, 3000, "Router HTTP port"),
    ("--prometheus-port", int, 9000, "Extra Prometheus listener port"),
    ("--shard-uds-path", str, "/tmp/text-generation-server", "Shard unix socket prefix"),
    ("--master-addr", str, "localhost", "torch.distributed address"),
    ("--master-port", int, 29500, "torch.distributed port"),
    ("--huggingface-hub-cache", str, None, "Hugging Face hub cache folder"),
    ("--weights-cache-override", str, None, "Folder that overrides the hub lookup"),
    ("--disable-custom-kernels", None, False, "Accepted for compatibility"),
    ("--cuda-memory-fraction", float, 1.0, "Share of device memory the shards may use"),
    ("--rope-scaling", str, None, "linear or dynamic"),
    ("--rope-factor", float, None, "RoPE scaling factor"),
    ("--json-output", None, False, "JSON log lines"),
    ("--otlp-endpoint", str, None, "OpenTelemetry OTLP/gRPC endpoint"),
    ("--otlp-service-name", str, "text-generation-inference.router", "OpenTelemetry service name"),
    ("--log-prompts", None, False, "Log prompts and generated text (never logged otherwise)"),
    ("--cors-allow-origin", str, None, "Allowed CORS origin (repeatable; none: any)"),
    ("--api-key", str, None, "Require `Authorization: Bearer <key>` on generation routes"),
    ("--watermark-gamma", float, None, "Watermark green-list share"),
    ("--watermark-delta", float, None, "Watermark bias"),
    ("--tokenizer-config-path", str, None, "tokenizer_config.json overriding the model's"),
    ("--disable-grammar-support", None, False, "Refuse grammar/tools/response_format"),
    ("--max-client-batch-size", _positive(int), 4, "Max prompts in one /v1/completions request"),
    ("--lora-adapters", str, None, "LoRA adapters (not supported yet)"),
    ("--usage-stats", str, "off", "Accepted for compatibility; tgserve sends no telemetry"),
    ("--payload-limit", _positive(int), 2_000_000, "Request body limit in bytes (413 over it)"),
    ("--enable-prefill-logprobs", None, True, "Prompt log-probabilities on request (always on)"),
    ("--graceful-termination-timeout", int, 90, "Seconds in-flight requests get on SIGTERM"),
    # tgserve's own flags.
    ("--kv-cache-memory", str, None, "Bytes of KV cache per shard, e.g. 1GiB (default: auto)"),
    ("--max-step-prefill-tokens", _positive(int), 256,
     "Prompt tokens admitted per step while others decode (time to first token vs. latency)"),
    ("--threads", int, 0, "torch threads per shard (0: one per core)"),
    ("--convert-pickle-weights", None, False, "Convert .bin checkpoints to safetensors"),
    ("--shard-ready-timeout", int, 600, "Seconds to wait for shards to load and warm up"),
]

REPEATABLE = {"--cors-allow-origin"}

# float16 halves the cache's memory and the bytes decode attention reads; the CPU kernels widen
# it to float32 as they load it (llama.cpp's default cache type is f16 too).
KV_CACHE_DTYPES = ("float16", "bfloat16", "float32")

QUANTIZE_METHODS = (
    "awq", "compressed-tensors", "eetq", "exl2", "gptq", "marlin", "bitsandbytes",
    "bitsandbytes-nf4", "bitsandbytes-fp4", "fp8",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tgserve",
        description="Serve a language model with TGI's API. Every flag also reads the "
        "environment variable named after it (--max-input-tokens: MAX_INPUT_TOKENS).",
    )
    for flag, kind, default, help_text in FLAGS:
        env = flag_default(flag)
        if kind is None:
            value = _bool(env) if env is not None else default
            p.add_argument(flag, action="store_true", default=value, help=help_text)
        elif flag in REPEATABLE:
            value = [v for v in env.split(",") if v] if env else []
            p.add_argument(flag, type=kind, action="append", default=value, help=help_text)
        else:
            value = kind(env) if env is not None else default
            p.add_argument(flag, type=kind, default=value, help=help_text)
    p.add_argument("-e", "--env", action="store_true", help="Print the runtime environment")
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_input_length is not None:
        if args.max_input_tokens is not None:
            parser.error("--max-input-tokens and --max-input-length cannot both be set")
        args.max_input_tokens = args.max_input_length
    if (
        args.max_input_tokens is not None
        and args.max_total_tokens is not None
        and args.max_input_tokens >= args.max_total_tokens
    ):
        parser.error(
            f"`max_input_tokens`({args.max_input_tokens}) must be < "
            f"`max_total_tokens`({args.max_total_tokens})"
        )
    if args.kv_cache_dtype is not None and args.kv_cache_dtype not in KV_CACHE_DTYPES:
        # TGI's fp8_e4m3fn / fp8_e5m2 included: refused rather than served in another dtype.
        parser.error(
            f"--kv-cache-dtype {args.kv_cache_dtype!r} is not implemented in tgserve; "
            f"one of: {', '.join(KV_CACHE_DTYPES)}"
        )
    for flag, value in (("--speculate", args.speculate), ("--lora-adapters", args.lora_adapters),
                        ("--rope-scaling", args.rope_scaling), ("--rope-factor", args.rope_factor)):
        if value:
            # Refuse rather than run without what the user asked for.
            parser.error(f"{flag} is not implemented yet in tgserve")
    if args.quantize is not None:
        if args.quantize not in QUANTIZE_METHODS:
            parser.error(
                f"--quantize {args.quantize!r} is not a method; one of: {', '.join(QUANTIZE_METHODS)}"
            )
        parser.error(
            f"--quantize {args.quantize}: quantized kernels are not implemented yet in tgserve; "
            "serve the model unquantized (GGUF files are dequantized at load)"
        )
    return args
