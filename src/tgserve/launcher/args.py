"""The launcher's command line: TGI's flag names and environment variables, built from Config."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from tgserve.config import Config, ConfigError, flag_fields, parse_bool
from tgserve.env import flag_default

log = logging.getLogger("tgserve.launcher")


def _for_argparse(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse reports ArgumentTypeError's message as it is; ValueError would lose it."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    convert.__name__ = parse.__name__
    return convert


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tgserve",
        description="Serve a language model with TGI's API. Every flag also reads the "
        "environment variable named after it (--max-input-tokens: MAX_INPUT_TOKENS).",
    )
    for f, meta in flag_fields():
        flag = "--" + f.name.replace("_", "-")
        env = flag_default(flag)
        if flag == "--hostname" and env is not None and not _is_ip_address(env):
            # Containers and pods set HOSTNAME to their own name, not an address to bind: as in
            # TGI, only an IP address there is taken as the bind address.
            env = None
        if meta.parse is None:
            default = parse_bool(env) if env is not None else f.default
            p.add_argument(flag, action="store_true", default=default, help=meta.help)
        elif meta.repeatable:
            default = [v for v in env.split(",") if v] if env else []  # no origin: any
            p.add_argument(flag, type=_for_argparse(meta.parse), action="append",
                           default=default, help=meta.help)
        else:
            default = meta.parse(env) if env is not None else f.default
            p.add_argument(flag, type=_for_argparse(meta.parse), default=default, help=meta.help)
    p.add_argument("-e", "--env", action="store_true", help="Print the runtime environment")
    return p


def parse(argv: list[str] | None = None) -> Config:
    """The configuration of this run: flags over environment over TGI's defaults, checked once."""
    return parse_command(argv)[0]


def parse_command(argv: list[str] | None = None) -> tuple[Config, bool]:
    """(the configuration, whether -e/--env asked for the runtime environment instead)."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    show_env = args.pop("env")
    args["cors_allow_origin"] = tuple(args["cors_allow_origin"])
    config = Config(**args)
    try:
        config.check()
    except ConfigError as e:
        parser.error(str(e))
    if config.max_input_length is not None:
        config = dataclasses.replace(config, max_input_tokens=config.max_input_length,
                                     max_input_length=None)
    return config, show_env
