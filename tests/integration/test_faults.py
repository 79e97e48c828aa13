"""Process faults: a dead shard stops the deployment; SIGTERM drains in-flight streams, exits 0."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from pathlib import Path

import httpx

from tests.integration.conftest import tiny_server
from tests.integration.server import alive, assert_no_orphans


def _shard_pid(server) -> int:  # type: ignore[no-untyped-def]
    for pid in server.children():
        if " shard " in f" {Path(f'/proc/{pid}/cmdline').read_text().replace(chr(0), ' ')} ":
            return pid
    raise AssertionError("no shard process found")


def test_killed_shard_stops_everything_within_10s(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    server = tiny_server(tiny_model_dir).start()
    try:
        children = server.children()
        assert len(children) == 2  # one shard and the router
        pid = _shard_pid(server)
        killed_at = time.monotonic()
        Path(f"/proc/{pid}")  # noqa: B018 (the process exists)
        import os

        os.kill(pid, signal.SIGKILL)
        code = server.process.wait(timeout=10)  # type: ignore[union-attr]
        assert time.monotonic() - killed_at < 10
        assert code != 0
        assert "shard-0 exited" in server.log()
        assert_no_orphans(children)
    finally:
        server.stop()


def test_sigterm_lets_a_streaming_request_finish(tiny_model_dir) -> None:  # type: ignore[no-untyped-def]
    server = tiny_server(tiny_model_dir, "--graceful-termination-timeout", "60").start()
    children = server.children()
    events: list[dict] = []
    started = threading.Event()

    def stream() -> None:
        body = {"inputs": "w1 w2 w3", "parameters": {"max_new_tokens": 400, "details": True}}
        with httpx.stream("POST", f"{server.url}/generate_stream", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 3:
                        started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        assert started.wait(60)
        server.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        time.sleep(0.3)
        # While draining, new requests get 503 + Retry-After: the port stays open until the
        # requests in flight are done (a refused connection would tell a balancer nothing).
        refused = httpx.post(f"{server.url}/generate", timeout=10,
                             json={"inputs": "w1", "parameters": {"max_new_tokens": 2}})
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        still_streaming = thread.is_alive()
        assert still_streaming, "the stream ended before the checks: make it longer"
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert refused.json()["error_type"] == "unavailable"
        assert ready.status_code == 503 and ready.json()["reason"] == "draining"
        thread.join(120)
        code = server.process.wait(timeout=60)  # type: ignore[union-attr]
    finally:
        server.stop()
    # Start-up said what it was doing (kernels, loading, warmup) and where each limit came from.
    log = server.log(lines=10_000)
    for said in ("kernels ready in", "warmup: a prefill of", "the shards are warm after"):
        assert said in log, said
    assert re.search(r"max_total_tokens +512 +flag", log)
    assert re.search(r"max_input_tokens +\d+ +warmup", log)
    assert events[-1]["details"]["generated_tokens"] == 400
    assert events[-1]["details"]["finish_reason"] == "length"
    assert len(events) == 400
    assert code == 0
    assert not any(alive(c) for c in children)
