"""The launcher's flags: TGI's names, env variables, defaults and start-up checks."""

from __future__ import annotations

import pytest

from tgserve.launcher.args import parse
from tgserve.launcher.supervisor import router_argv, shard_argv
from tgserve.launcher.weights import ModelSource


def test_tgi_defaults() -> None:
    a = parse([])
    assert (a.max_concurrent_requests, a.max_best_of, a.max_stop_sequences) == (128, 2, 4)
    assert (a.max_top_n_tokens, a.waiting_served_ratio, a.max_waiting_tokens) == (5, 0.3, 20)
    assert (a.port, a.hostname, a.payload_limit, a.max_client_batch_size) == (3000, "0.0.0.0",
                                                                              2_000_000, 4)
    assert a.model_id is None and a.max_input_tokens is None and a.max_total_tokens is None


def test_every_flag_reads_its_env_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_TOTAL_TOKENS", "4096")
    monkeypatch.setenv("JSON_OUTPUT", "true")
    monkeypatch.setenv("CORS_ALLOW_ORIGIN", "https://a.example,https://b.example")
    a = parse(["--port", "8080"])
    assert a.max_total_tokens == 4096 and a.json_output is True and a.port == 8080
    assert a.cors_allow_origin == ["https://a.example", "https://b.example"]


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
    ],
)
def test_startup_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code != 0
    assert message in capsys.readouterr().err


def test_router_gets_the_limits() -> None:
    a = parse(["--max-total-tokens", "2048", "--api-key", "k", "--cors-allow-origin", "https://x"])
    argv = router_argv(a, ModelSource("m", __import__("pathlib").Path("/m"), None, None))
    joined = " ".join(argv)
    assert "--max-total-tokens 2048" in joined and "--api-key k" in joined
    assert "--cors-allow-origin https://x" in joined and "--max-input-tokens" not in joined


def test_kv_cache_dtype_reaches_the_shards() -> None:
    source = ModelSource("m", __import__("pathlib").Path("/m"), None, None)
    argv = shard_argv(parse(["--kv-cache-dtype", "float16"]), source, 0, 1)
    assert argv[argv.index("--kv-cache-dtype") + 1] == "float16"
    assert "--kv-cache-dtype" not in shard_argv(parse([]), source, 0, 1)  # the model's dtype
