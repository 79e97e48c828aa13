"""`tgserve` (alias `text-generation-launcher`): the launcher, plus internal subcommands.

`tgserve shard` and `tgserve router` are the launcher's children: they take no flags and read the
launcher's configuration from the environment (env.child_config)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    if command in ("shard", "router"):
        return child(command, argv[1:])
    if command == "benchmark":
        from tgserve.benchmark import cli as bench

        return bench.main(argv[1:])
    if command == "benchmark-shard":
        from tgserve.benchmark.shard import cli as shard_bench

        return shard_bench.main(argv[1:])
    return launch(argv)


def child(command: str, argv: list[str]) -> int:
    """The launcher's children: a short message, not a traceback, when started by hand."""
    from tgserve.env import MissingConfigError

    if command == "shard":
        from tgserve.shard.server import main as entry
    else:
        from tgserve.router.main import main as entry
    try:
        return entry(argv)
    except MissingConfigError as e:
        print(f"tgserve {command}: {e}", file=sys.stderr)
        return 2


def launch(argv: list[str]) -> int:
    from tgserve.launcher.args import parse_command
    from tgserve.launcher.supervisor import Supervisor
    from tgserve.logs import setup_logging

    config, show_env = parse_command(argv)
    setup_logging(json_output=config.json_output, component="launcher")
    if show_env:
        from tgserve.launcher.runtime_env import print_env

        print_env()
        return 0
    return Supervisor(config).run()


if __name__ == "__main__":
    sys.exit(main())
