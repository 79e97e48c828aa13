"""The only module that reads environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from tgserve.config import Config


def flag_default(flag: str) -> str | None:
    """TGI reads every launcher flag from an env var named after it (--max-input-tokens:
    MAX_INPUT_TOKENS)."""
    return os.environ.get(flag.lstrip("-").replace("-", "_").upper())


def cache_dir() -> Path:
    base = os.environ.get("TGSERVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tgserve"
    )
    return Path(base)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def prefix_caching() -> bool:
    """TGI's PREFIX_CACHING switch (on unless set to a false value); shards report it in Info."""
    return os.environ.get("PREFIX_CACHING", "1").lower() not in ("0", "false", "no", "off")


# Largest batch whose next decode step a shard computes while the router handles the last one.
DECODE_AHEAD_MAX_BATCH = 16


def decode_ahead_max_batch() -> int:
    """TGSERVE_DECODE_AHEAD_MAX_BATCH, or DECODE_AHEAD_MAX_BATCH; 0 turns decoding ahead off."""
    value = os.environ.get("TGSERVE_DECODE_AHEAD_MAX_BATCH")
    return DECODE_AHEAD_MAX_BATCH if value in (None, "") else max(int(value), 0)


# The launcher's Config, serialized, in the environment of each child: an environment variable
# rather than argv, so that an API key is not shown by `ps` to other users.
CONFIG_VARIABLE = "TGSERVE_CONFIG"


class MissingConfigError(RuntimeError):
    """A child process started without the launcher's Config."""


def child_config() -> Config:
    """The Config the launcher handed this child process."""
    text = os.environ.get(CONFIG_VARIABLE)
    if not text:
        raise MissingConfigError(
            f"{CONFIG_VARIABLE} is not set: `tgserve shard` and `tgserve router` are started by "
            "the launcher (`tgserve`), not by hand"
        )
    return Config.from_json(text)


def rank() -> int:
    """This shard's rank, as torch.distributed names it (RANK, set by the launcher)."""
    return int(os.environ.get("RANK", "0"))


def child_environment(extra: dict[str, str], config: Config | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    if config is not None:
        env[CONFIG_VARIABLE] = config.to_json()
    return env


# What a shard runs with unless the user's environment says otherwise.
SHARD_DEFAULTS = {
    # torch's CPU allocator asks for 2 MiB pages (madvise) for tensors of 2 MiB and up. A decode
    # step streams every weight once; in 4 KiB pages the stream crosses a page, where the hardware
    # prefetcher stops and the TLB misses, every 4 KiB (docs/design/transparent-huge-pages.md).
    # Kernels whose transparent huge pages are "never" ignore it.
    "THP_MEM_ALLOC_ENABLE": "1",
}


def shard_environment(extra: dict[str, str], config: Config | None = None) -> dict[str, str]:
    """A shard's environment: the launcher's, SHARD_DEFAULTS where it is silent, then `extra`."""
    env = {**SHARD_DEFAULTS, **os.environ}
    env.update(extra)
    if config is not None:
        env[CONFIG_VARIABLE] = config.to_json()
    return env
