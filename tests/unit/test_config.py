"""Every launcher flag is read by some process, or refused at start, or explained at start."""

from __future__ import annotations

import ast
import dataclasses
import logging
from pathlib import Path

import pytest

from tgserve.config import (
    LAUNCHER,
    ROUTER,
    SHARD,
    Config,
    Flag,
    flag_fields,
    parse_bool,
    parse_bytes,
)
from tgserve.launcher.args import build_parser, parse

SRC = Path(__file__).resolve().parents[2] / "src" / "tgserve"

# Where each process turns the Config into its own settings: a flag it uses is read there.
ENTRY_POINTS = {
    LAUNCHER: [SRC / "cli.py", *sorted((SRC / "launcher").glob("*.py"))],
    ROUTER: [SRC / "router" / "main.py"],
    SHARD: [SRC / "shard" / "server.py"],
}


def _fields_read_by_members() -> dict[str, set[str]]:
    """Config's methods and properties, each with the fields it reads through `self`."""
    tree = ast.parse((SRC / "config.py").read_text())
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    return {
        fn.name: {a.attr for a in ast.walk(fn)
                  if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name)
                  and a.value.id == "self"}
        for fn in config.body if isinstance(fn, ast.FunctionDef)
    }


def fields_read(process: str) -> set[str]:
    """Fields the process's entry modules read as `config.<name>` (or `self.config.<name>`),
    directly or through a Config method."""
    members = _fields_read_by_members()
    read: set[str] = set()
    for path in ENTRY_POINTS[process]:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            named_config = (isinstance(owner, ast.Name) and owner.id == "config") or (
                isinstance(owner, ast.Attribute) and owner.attr == "config")
            if named_config:
                read.add(node.attr)
                read |= members.get(node.attr, set())
    return read


def sample(meta: Flag) -> str | None:
    """A value other than the default, as typed on the command line (None: a switch)."""
    if meta.parse is None:
        return None
    probe = {parse_bool: "true", parse_bytes: "1MiB", float: "0.25"}
    if meta.parse in probe:
        return probe[meta.parse]
    return "3" if meta.parse.__name__ == "int" else "x"


FLAGS = [pytest.param(f, meta, id=f.name) for f, meta in flag_fields()]


def test_the_parser_has_exactly_the_config_flags() -> None:
    declared = {"--" + f.name.replace("_", "-") for f, _ in flag_fields()}
    parsed = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")}
    assert parsed - {"--help", "--env"} == declared


@pytest.mark.parametrize(("field", "meta"), FLAGS)
def test_every_flag_is_used_refused_or_explained(
    field: dataclasses.Field, meta: Flag, capsys: pytest.CaptureFixture[str]
) -> None:
    flag = "--" + field.name.replace("_", "-")
    kinds = [bool(meta.used_by), meta.refused, meta.notice is not None]
    assert sum(kinds) == 1, f"{flag}: say exactly one of used_by, refused, notice"
    value = sample(meta)
    argv = [flag] if value is None else [flag, value]
    if meta.used_by:
        for process in meta.used_by:
            assert field.name in fields_read(process), f"{flag}: the {process} never reads it"
    elif meta.refused:
        with pytest.raises(SystemExit):
            parse(argv)
        assert flag in capsys.readouterr().err
    else:
        assert any(note.startswith(f"{flag} changes nothing") for note in parse(argv).notices())


def test_the_launcher_says_which_flags_change_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from tgserve.launcher.supervisor import Supervisor

    launcher = Supervisor(parse(["--trust-remote-code", "--model-id", "/nonexistent/model"]))
    with caplog.at_level(logging.INFO, logger="tgserve.launcher"):
        assert launcher.run() == 1  # the model cannot be resolved; the notice came first
    assert "--trust-remote-code changes nothing: tgserve runs its own model code" in caplog.text


def test_defaults_print_no_notice() -> None:
    assert parse([]).notices() == []


def test_a_child_needs_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    from tgserve import env

    monkeypatch.delenv(env.CONFIG_VARIABLE, raising=False)
    with pytest.raises(RuntimeError, match="started by the launcher"):
        env.child_config()
    monkeypatch.setenv(env.CONFIG_VARIABLE, Config(port=1234).to_json())
    assert env.child_config().port == 1234


def test_an_unknown_field_from_another_version_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown configuration fields"):
        Config.from_json('{"no_such_flag": 1}')


def flags_table() -> str:
    """The README's flag table, rendered from Config."""

    def shown(f: dataclasses.Field, meta: Flag) -> str:
        if meta.parse is None:
            return "on" if f.default else "off"
        return "—" if f.default in (None, ()) else f"`{f.default}`"

    rows = ["| Flag | Default | Meaning |", "|---|---|---|"]
    rows += [f"| `--{f.name.replace('_', '-')}` | {shown(f, meta)} | {meta.help} |"
             for f, meta in flag_fields()]
    return "\n".join(rows)


def test_the_readme_lists_every_flag_as_config_declares_it() -> None:
    readme = (SRC.parents[1] / "README.md").read_text()
    assert flags_table() in readme, "regenerate: python -c 'from tests.unit.test_config import " \
        "flags_table; print(flags_table())'"


def test_a_child_started_by_hand_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tgserve import cli, env

    monkeypatch.delenv(env.CONFIG_VARIABLE, raising=False)
    assert cli.main(["router"]) == 2
    assert "started by the launcher" in capsys.readouterr().err
