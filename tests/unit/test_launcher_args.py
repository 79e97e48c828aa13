"""The launcher's flags: TGI's names, env variables, defaults, start-up checks, and what each
child process receives."""

from __future__ import annotations

from pathlib import Path

import pytest

from tgserve.config import Config
from tgserve.env import CONFIG_VARIABLE
from tgserve.launcher.args import parse
from tgserve.launcher.supervisor import resolved, router_command, shard_command
from tgserve.launcher.weights import ModelSource

SOURCE = ModelSource("m", Path("/m"), None, None)


def router_config(config: Config) -> Config:
    """What `tgserve router` reads: the Config in its environment."""
    argv, env = router_command(resolved(config, SOURCE, 1))
    assert argv[-1] == "router"  # no flags: the configuration travels whole in the environment
    return Config.from_json(env[CONFIG_VARIABLE])


def shard_config(config: Config, rank: int = 0) -> Config:
    argv, env = shard_command(resolved(config, SOURCE, 2), rank)
    assert argv[-1] == "shard" and env["RANK"] == str(rank)
    return Config.from_json(env[CONFIG_VARIABLE])


def test_tgi_defaults() -> None:
    a = parse([])
    assert (a.max_concurrent_requests, a.max_best_of, a.max_stop_sequences) == (128, 2, 4)
    assert (a.max_top_n_tokens, a.waiting_served_ratio, a.max_waiting_tokens) == (5, 0.3, 20)
    assert (a.port, a.hostname, a.payload_limit, a.max_client_batch_size) == (3000, "0.0.0.0",
                                                                              2_000_000, 4)
    assert a.model_id is None and a.max_input_tokens is None and a.max_total_tokens is None
    assert (a.watermark_gamma, a.watermark_delta) == (0.5, 2.0)


def test_every_flag_reads_its_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "4096")
    monkeypatch.setenv("JSON_OUTPUT", "true")
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", "https://a.example,https://b.example")
    monkeypatch.setenv("KV_CACHE_MEMORY", "1MiB")
    a = parse(["--port", "8080"])
    assert a.max_total_tokens == 4096 and a.json_output is True and a.port == 8080
    assert a.cors_allow_origin == ("https://a.example", "https://b.example")
    assert a.kv_cache_memory == 2**20


@pytest.mark.parametrize(("variable", "bound"), [
    ("tgserve-7d9f-abcde", "0.0.0.0"),  # a pod's name: not an address to bind
    ("127.0.0.1", "127.0.0.1"),
    ("::1", "::1"),
])
def test_hostname_from_the_environment_only_when_an_ip(
    monkeypatch: pytest.MonkeyPatch, variable: str, bound: str
) -> None:
    monkeypatch.setenv("HOSTNAME", variable)
    assert parse([]).hostname == bound
    assert parse(["--hostname", "localhost"]).hostname == "localhost"  # a flag is taken as given


def test_legacy_alias_and_conflict(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse(["--max-input-length", "100"]).max_input_tokens == 100
    with pytest.raises(SystemExit):
        parse(["--max-input-length", "100", "--max-input-tokens", "100"])
    assert "cannot both be set" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-input-tokens", "10", "--max-total-tokens", "10"],
         "`max_input_tokens`(10) must be < `max_total_tokens`(10)"),
        (["--quantize", "nope"], "is not a method"),
        (["--quantize", "gptq"], "not implemented yet"),
        (["--speculate", "2"], "--speculate is not implemented yet"),
        (["--kv-cache-dtype", "fp8_e5m2"], "'fp8_e5m2' is not implemented in tgserve"),
        (["--max-batch-size", "0"], "must be > 0"),
        (["--kv-cache-memory", "lots"], "not a size: 'lots'"),
        (["--watermark-gamma", "1.5"], "--watermark-gamma must be in (0, 1)"),
    ],
)
def test_startup_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def test_router_gets_the_limits() -> None:
    config = router_config(parse(["--max-total-tokens", "2048", "--api-key", "k",
                                  "--cors-allow-origin", "https://x"]))
    assert config.max_total_tokens == 2048 and config.api_key == "k"
    assert config.cors_allow_origin == ("https://x",) and config.max_input_tokens is None
    assert config.model_name == "m" and config.model_path == "/m"


def test_the_api_key_is_not_on_the_command_line() -> None:
    argv, _ = router_command(resolved(parse(["--api-key", "secret"]), SOURCE, 1))
    assert "secret" not in " ".join(argv)


def test_kv_cache_dtype_and_watermark_reach_the_shards() -> None:
    config = shard_config(parse(["--kv-cache-dtype", "float16", "--watermark-gamma", "0.25",
                                 "--watermark-delta", "3"]), rank=1)
    assert config.kv_cache_dtype == "float16" and config.world_size == 2
    assert (config.watermark_gamma, config.watermark_delta) == (0.25, 3.0)
    assert shard_config(parse([])).kv_cache_dtype is None  # the model's dtype


def test_the_configuration_survives_the_trip_to_a_child() -> None:
    config = resolved(parse(["--cors-allow-origin", "a", "--cors-allow-origin", "b",
                             "--kv-cache-memory", "2MiB", "--json-output"]), SOURCE, 1)
    assert Config.from_json(config.to_json()) == config


def test_children_refuse_flags() -> None:
    from tgserve.router.main import main as router_main
    from tgserve.shard.server import main as shard_main

    for main in (router_main, shard_main):
        with pytest.raises(SystemExit, match="takes no arguments"):
            main(["--port", "1"])
