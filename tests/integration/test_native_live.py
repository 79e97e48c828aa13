"""The real launcher on the default model: routes, continuous batching, cancellation."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.integration.server import LaunchedServer


def stream_tokens(url: str, body: dict, on_event=None) -> list[tuple[float, dict]]:  # type: ignore[no-untyped-def]
    out: list[tuple[float, dict]] = []
    with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                out.append((time.monotonic(), event))
                if on_event is not None:
                    on_event(event)
    return out


def test_health_info_and_docs(default_server: LaunchedServer) -> None:
    url = default_server.url
    assert httpx.get(f"{url}/health").status_code == 200
    info = httpx.get(f"{url}/info").json()
    assert info["max_input_tokens"] == 1000 and info["max_total_tokens"] == 2048
    assert info["router"] == "text-generation-router"
    spec = httpx.get(f"{url}/api-doc/openapi.json").json()
    assert "/generate_stream" in spec["paths"]
    assert httpx.get(f"{url}/docs").status_code == 200


def test_generate_greedy_details(default_server: LaunchedServer) -> None:
    body = {"inputs": "The capital of France is",
            "parameters": {"max_new_tokens": 8, "details": True, "decoder_input_details": True,
                           "top_n_tokens": 2}}
    r = httpx.post(f"{default_server.url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    details = out["details"]
    assert details["generated_tokens"] == 8 and details["finish_reason"] == "length"
    assert "Paris" in out["generated_text"]
    assert "".join(t["text"] for t in details["tokens"]) == out["generated_text"]
    assert details["prefill"][0]["logprob"] is None and len(details["prefill"]) == 5
    assert all(len(t) >= 2 for t in details["top_tokens"])
    assert int(r.headers["x-generated-tokens"]) == 8


def test_stream_events_and_errors(default_server: LaunchedServer) -> None:
    events = [e for _, e in stream_tokens(default_server.url, {
        "inputs": "Hello", "parameters": {"max_new_tokens": 4, "details": True}})]
    assert [e["index"] for e in events] == [1, 2, 3, 4]
    assert all(e["generated_text"] is None for e in events[:-1])
    assert events[-1]["details"]["generated_tokens"] == 4
    bad = stream_tokens(default_server.url, {"inputs": "Hi", "parameters": {"temperature": -1}})
    assert bad[0][1]["error_type"] == "validation"


def test_validation_error_shape(default_server: LaunchedServer) -> None:
    r = httpx.post(f"{default_server.url}/generate",
                   json={"inputs": "Hi", "parameters": {"max_new_tokens": 5000}})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"
    assert "2048" in r.json()["error"]


def test_short_request_overtakes_a_long_one(default_server: LaunchedServer) -> None:
    url = default_server.url
    long_body = {"inputs": "Once upon a time, in a land far away,",
                 "parameters": {"max_new_tokens": 60, "details": True, "ignore_eos": True}}
    started = threading.Event()
    result: list[list[tuple[float, dict]]] = []

    def run_long() -> None:
        result.append(stream_tokens(url, long_body, lambda e: started.set()))

    thread = threading.Thread(target=run_long)
    thread.start()
    assert started.wait(120)
    short = httpx.post(f"{url}/generate", timeout=120,
                       json={"inputs": "Say hi.", "parameters": {"max_new_tokens": 3}})
    short_done = time.monotonic()
    thread.join(300)
    assert short.status_code == 200
    long_events = result[0]
    long_done = long_events[-1][0]
    assert short_done < long_done, "the short request must finish first"
    # The long stream kept producing tokens while the short one ran: both were in one batch.
    during = [t for t, _ in long_events if t < short_done]
    after = [t for t, _ in long_events if t > short_done]
    assert len(during) >= 2 and len(after) >= 2
    assert len(long_events) == 60
    alone = stream_tokens(url, long_body)
    assert [e["token"]["id"] for _, e in alone] == [e["token"]["id"] for _, e in long_events]


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_frees_blocks(default_server: LaunchedServer, stream: bool) -> None:
    url = default_server.url
    body = {"inputs": "Count to one thousand: 1, 2, 3,",
            "parameters": {"max_new_tokens": 500, "ignore_eos": True}}
    assert _metric(url, "tgserve_kv_blocks_used") == 0
    if stream:
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as r:
            lines = r.iter_lines()  # kept alive: dropping it would close the connection early
            for _ in range(8):
                next(lines)
            assert _metric(url, "tgi_batch_current_size") == 1
            assert _metric(url, "tgserve_kv_blocks_used") > 0
            del lines
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/generate", json=body, timeout=2.0)
    # Within a decode step (~0.1 s idle) plus the HTTP layer noticing. The window is wide for a
    # loaded CI machine (2 s failed once under contention) and still far below the 500 steps the
    # request would otherwise run.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _metric(url, "tgserve_kv_blocks_used") > 0:
        time.sleep(0.05)
    assert _metric(url, "tgserve_kv_blocks_used") == 0
    assert _metric(url, "tgi_batch_current_size") == 0
