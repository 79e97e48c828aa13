"""Starts the shards and the router, waits until they are ready, and stops everything together."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path

from tgserve import env as environment
from tgserve.launcher.processes import Child, python_command, remove_stale
from tgserve.isolated import in_child_process
from tgserve.launcher.source import ModelSource

log = logging.getLogger("tgserve.launcher")


class LauncherError(RuntimeError):
    pass


def shard_argv(args: argparse.Namespace, source: ModelSource, rank: int, world: int) -> list[str]:
    argv = python_command(
        "shard", "--model-path", str(source.path), "--uds-path", args.shard_uds_path,
        "--rank", str(rank), "--world-size", str(world),
        "--master-addr", args.master_addr, "--master-port", str(args.master_port),
        "--memory-fraction", str(args.cuda_memory_fraction), "--threads", str(args.threads),
    )
    if source.gguf_file is not None:
        argv += ["--gguf-file", str(source.gguf_file)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    if args.kv_cache_dtype:
        argv += ["--kv-cache-dtype", args.kv_cache_dtype]
    if args.kv_cache_memory:
        argv += ["--kv-cache-memory", args.kv_cache_memory]
    if args.json_output:
        argv.append("--json-output")
    if args.otlp_endpoint:
        argv += ["--otlp-endpoint", args.otlp_endpoint,
                 "--otlp-service-name", shard_service_name(args.otlp_service_name)]
    return argv


def shard_service_name(router_name: str) -> str:
    """TGI's naming: `….router` for the router, `….server` for the shards."""
    return router_name.removesuffix(".router") + ".server"


ROUTER_FLAGS = (
    "max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_top_n_tokens",
    "max_input_tokens", "max_total_tokens", "waiting_served_ratio", "max_batch_prefill_tokens",
    "max_batch_total_tokens", "max_waiting_tokens", "max_batch_size", "max_step_prefill_tokens",
    "hostname", "port",
    "prometheus_port", "validation_workers", "api_key", "payload_limit", "max_client_batch_size",
    "otlp_endpoint", "otlp_service_name", "graceful_termination_timeout", "tokenizer_config_path",
)


def router_argv(args: argparse.Namespace, source: ModelSource) -> list[str]:
    argv = python_command(
        "router", "--master-shard-uds-path", f"{args.shard_uds_path}-0",
        "--tokenizer-name", str(source.path), "--model-id", source.model_id,
    )
    for name in ROUTER_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    for origin in args.cors_allow_origin:
        argv += ["--cors-allow-origin", origin]
    if args.json_output:
        argv.append("--json-output")
    if args.disable_grammar_support:
        argv.append("--disable-grammar-support")
    if args.log_prompts:
        argv.append("--log-prompts")
    return argv


class Supervisor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children: list[Child] = []
        self.stopping = threading.Event()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        try:
            source = self._resolve()
            world = self._num_shard()
            self._start_shards(source, world)
            if self.stopping.is_set():
                return self._shutdown(0)
            router = Child.spawn("router", router_argv(self.args, source),
                                 environment.child_environment({}))
            self.children.append(router)
            return self._watch()
        except LauncherError as e:
            log.error("%s", e)
            return self._shutdown(1)

    def _resolve(self) -> ModelSource:
        a = self.args
        hub_cache = Path(a.huggingface_hub_cache) if a.huggingface_hub_cache else None
        model_id = a.weights_cache_override or a.model_id
        try:
            return in_child_process(_resolve_model, model_id, a.revision, hub_cache,
                                    environment.cache_dir(), a.convert_pickle_weights,
                                    a.json_output)
        except Exception as e:  # every resolution failure is the user's to fix: say what and why
            raise LauncherError(f"cannot resolve the model: {e}") from e

    def _num_shard(self) -> int:
        if self.args.num_shard is not None:
            return self.args.num_shard
        if self.args.sharded:
            raise LauncherError("--sharded needs --num-shard on this machine (no GPUs to count)")
        return 1

    def _start_shards(self, source: ModelSource, world: int) -> None:
        for rank in range(world):
            remove_stale(f"{self.args.shard_uds_path}-{rank}")
            extra = {"RANK": str(rank), "WORLD_SIZE": str(world),
                     "MASTER_ADDR": self.args.master_addr, "MASTER_PORT": str(self.args.master_port)}
            argv = shard_argv(self.args, source, rank, world)
            self.children.append(Child.spawn(f"shard-{rank}", argv,
                                             environment.shard_environment(extra)))
        deadline = time.monotonic() + self.args.shard_ready_timeout
        pending = {f"{self.args.shard_uds_path}-{r}" for r in range(world)}
        last_note = time.monotonic()
        while pending and not self.stopping.is_set():
            self._check_children()
            pending = {p for p in pending if not os.path.exists(p)}
            if time.monotonic() > deadline:
                raise LauncherError(
                    f"shards not ready after {self.args.shard_ready_timeout}s "
                    f"(waiting for {sorted(pending)}); raise --shard-ready-timeout"
                )
            if time.monotonic() - last_note > 10:
                log.info("waiting for %d shard(s) to be ready...", len(pending))
                last_note = time.monotonic()
            time.sleep(0.1)
        log.info("shards ready")

    def _check_children(self) -> None:
        for child in self.children:
            code = child.exit_code
            if code is not None:
                raise LauncherError(
                    f"{child.name} exited with code {code}; its last lines:\n{child.last_lines()}"
                )

    def _watch(self) -> int:
        while not self.stopping.is_set():
            self._check_children()
            time.sleep(0.1)
        return self._shutdown(0)

    def _shutdown(self, code: int) -> int:
        """Router first (it drains in-flight requests), then the shards."""
        # After a failure nothing useful can finish: do not make the user wait for the grace period.
        grace = float(self.args.graceful_termination_timeout) if code == 0 else 2.0
        for child in sorted(self.children, key=lambda c: c.name != "router"):
            child.terminate(grace + 5 if child.name == "router" else 10)
        failed = [c for c in self.children if c.exit_code not in (0, -signal.SIGTERM, None)]
        if code == 0 and failed:
            log.warning("children exited uncleanly: %s",
                        ", ".join(f"{c.name}={c.exit_code}" for c in failed))
        log.info("stopped")
        return code


def _resolve_model(
    model_id: str | None, revision: str | None, hub_cache: Path | None, cache_dir: Path,
    allow_pickle_conversion: bool, json_output: bool,
) -> ModelSource:
    """weights.resolve_model, for a child process: huggingface_hub, which it imports, would stay
    in the launcher's memory (~25 MB) for as long as the server runs."""
    from tgserve.launcher.weights import resolve_model
    from tgserve.logs import setup_logging

    setup_logging(json_output=json_output, component="launcher")  # its logs are the launcher's

    return resolve_model(model_id, revision, hub_cache, cache_dir,
                         allow_pickle_conversion=allow_pickle_conversion)
