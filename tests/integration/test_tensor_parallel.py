"""Two shards (tensor parallel over gloo on the CPU) answer exactly what one shard answers."""

from __future__ import annotations

import httpx

from tests.integration.conftest import tiny_server

BODY = {"inputs": "w5 w17 w300 w42", "parameters": {"max_new_tokens": 24, "details": True,
                                                  "decoder_input_details": True}}


def _generate(server) -> dict:  # type: ignore[no-untyped-def]
    r = httpx.post(f"{server.url}/generate", json=BODY, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_two_shards_equal_one(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    one = tiny_server(tiny_model_dir).start()
    try:
        expected = _generate(one)
    finally:
        one.stop()
    two = tiny_server(tiny_model_dir, "--num-shard", "2").start()
    try:
        assert len(two.children()) == 3  # two shards and the router
        got = _generate(two)
    finally:
        two.stop()
    assert got["generated_text"] == expected["generated_text"]
    ids = [t["id"] for t in got["details"]["tokens"]]
    assert ids == [t["id"] for t in expected["details"]["tokens"]]
    for a, b in zip(got["details"]["tokens"], expected["details"]["tokens"]):
        assert abs(a["logprob"] - b["logprob"]) < 1e-4
