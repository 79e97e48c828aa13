"""Starts the shards and the router, waits until they are ready, and stops everything together."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from pathlib import Path

from tgserve import env as environment
from tgserve import uds
from tgserve.config import Config, default_shard_uds_path
from tgserve.isolated import in_child_process
from tgserve.launcher.processes import Child, free_tcp_port, python_command, tcp_port_in_use
from tgserve.launcher.source import ModelSource

log = logging.getLogger("tgserve.launcher")


class LauncherError(RuntimeError):
    pass


def shard_command(config: Config, rank: int) -> tuple[list[str], dict[str, str]]:
    """A shard's command line and environment: the whole configuration travels in the latter."""
    extra = {"RANK": str(rank), "WORLD_SIZE": str(config.world_size),
             "MASTER_ADDR": config.master_addr, "MASTER_PORT": str(config.master_port)}
    return python_command("shard"), environment.shard_environment(extra, config)


def router_command(config: Config) -> tuple[list[str], dict[str, str]]:
    return python_command("router"), environment.child_environment({}, config)


def resolved(config: Config, source: ModelSource, world_size: int) -> Config:
    """The configuration the children get: the flags plus what the launcher found.

    The shards' socket prefix and torch.distributed port, unless given, are this server's own:
    TGI's fixed defaults would make a second server on the host take over the first's.
    """
    return dataclasses.replace(
        config, model_name=source.model_id, model_path=str(source.path),
        gguf_file=str(source.gguf_file) if source.gguf_file is not None else None,
        world_size=world_size,
        shard_uds_path=config.shard_uds_path or default_shard_uds_path(config.port),
        master_port=config.master_port if config.master_port is not None else free_tcp_port(),
    )


def claim_sockets(config: Config) -> None:
    """Remove what stopped servers left at the shards' socket paths, and refuse to start (before
    anything is spawned) if a live server answers at any of them."""
    for rank in range(config.world_size):
        path = config.shard_socket(rank)
        try:
            uds.remove_stale(path)
        except uds.SocketInUse as e:
            raise LauncherError(f"--shard-uds-path {config.shard_uds_path}: {e}") from e
        except OSError as e:
            raise LauncherError(f"--shard-uds-path {config.shard_uds_path}: cannot remove "
                                f"{path}: {e}") from e
    if config.world_size > 1 and config.master_port is not None and tcp_port_in_use(
        config.master_port
    ):
        raise LauncherError(f"--master-port {config.master_port} is in use by another process; "
                            "give another, or leave it unset for a free one")


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.children: list[Child] = []
        self.stopping = threading.Event()
        # Each shard's socket as it was bound: (child name, path, identity).
        self.sockets: list[tuple[str, str, uds.Identity | None]] = []

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        for notice in self.config.notices():
            log.info("%s", notice)
        try:
            config = resolved(self.config, self._resolve(), self._num_shard())
            self._start_shards(config)
            if self.stopping.is_set():
                return self._shutdown(0)
            self.children.append(Child.spawn("router", *router_command(config)))
            return self._watch()
        except LauncherError as e:
            log.error("%s", e)
            return self._shutdown(1)

    def _resolve(self) -> ModelSource:
        config = self.config
        hub_cache = Path(config.huggingface_hub_cache) if config.huggingface_hub_cache else None
        model_id = config.weights_cache_override or config.model_id
        try:
            return in_child_process(_resolve_model, model_id, config.revision, hub_cache,
                                    environment.cache_dir(), config.convert_pickle_weights,
                                    config.json_output)
        except Exception as e:  # every resolution failure is the user's to fix: say what and why
            raise LauncherError(f"cannot resolve the model: {e}") from e

    def _num_shard(self) -> int:
        if self.config.num_shard is not None:
            return self.config.num_shard
        if self.config.sharded:
            raise LauncherError("--sharded needs --num-shard on this machine (no GPUs to count)")
        return 1

    def _start_shards(self, config: Config) -> None:
        claim_sockets(config)
        for rank in range(config.world_size):
            self.children.append(Child.spawn(f"shard-{rank}", *shard_command(config, rank)))
        deadline = time.monotonic() + config.shard_ready_timeout
        pending = {config.shard_socket(r) for r in range(config.world_size)}
        last_note = time.monotonic()
        while pending and not self.stopping.is_set():
            self._check_children()
            pending = {p for p in pending if not os.path.exists(p)}
            if time.monotonic() > deadline:
                raise LauncherError(
                    f"shards not ready after {config.shard_ready_timeout}s "
                    f"(waiting for {sorted(pending)}); raise --shard-ready-timeout"
                )
            if time.monotonic() - last_note > 10:
                log.info("waiting for %d shard(s) to load the model (%.0fs so far, up to "
                         "--shard-ready-timeout %ds)", len(pending),
                         time.monotonic() - deadline + config.shard_ready_timeout,
                         config.shard_ready_timeout)
                last_note = time.monotonic()
            time.sleep(0.1)
        paths = [config.shard_socket(r) for r in range(config.world_size)]
        self.sockets = [(f"shard-{r}", p, uds.identity(p)) for r, p in enumerate(paths)]
        log.info("shards ready")

    def _check_children(self) -> None:
        for child in self.children:
            code = child.exit_code
            if code is not None:
                raise LauncherError(
                    f"{child.name} exited with code {code}; its last lines:\n{child.last_lines()}"
                )

    def _check_sockets(self) -> None:
        """The router reaches each shard by its socket's path, reconnecting by it too: a shard
        whose socket was removed (or bound anew by another process) is lost to it for good."""
        for name, path, bound in self.sockets:
            now = uds.identity(path)
            if now == bound and uds.answers(path):
                continue
            self._check_children()  # a shard that died says so better by its exit code
            if now is None:
                raise LauncherError(f"{name}'s socket {path} was removed (by another process?): "
                                    "the router can no longer reach it")
            if now != bound:
                raise LauncherError(f"{name}'s socket {path} was replaced by another process's: "
                                    "the router would reach the wrong shard")
            raise LauncherError(f"{name} no longer answers on its socket {path}")

    def _watch(self) -> int:
        # Child exits are noticed within a tick; the sockets, which need a stat and a connect
        # each, every few ticks.
        tick = 0
        while not self.stopping.is_set():
            self._check_children()
            if tick % 10 == 0:
                self._check_sockets()
            tick += 1
            time.sleep(0.1)
        return self._shutdown(0)

    def _shutdown(self, code: int) -> int:
        """Router first (it drains in-flight requests), then the shards."""
        # After a failure nothing useful can finish: do not make the user wait for the grace period.
        grace = float(self.config.graceful_termination_timeout) if code == 0 else 2.0
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
    in the launcher's memory for as long as the server runs."""
    from tgserve.launcher.weights import resolve_model
    from tgserve.logs import setup_logging

    setup_logging(json_output=json_output, component="launcher")  # its logs are the launcher's

    return resolve_model(model_id, revision, hub_cache, cache_dir,
                         allow_pickle_conversion=allow_pickle_conversion)
