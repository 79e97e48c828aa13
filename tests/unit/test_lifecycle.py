"""The router's phases over HTTP: warming up, serving, draining; readiness; the limits table."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.unit import test_native_api
from tests.unit.test_native_api import FakeBackend, build
from tgserve.config import Config
from tgserve.router.core.scheduler import SchedulerSettings
from tgserve.router.lifecycle import RETRY_AFTER_S, Lifecycle
from tgserve.router.main import limits_table

tokenizer = test_native_api.tokenizer  # the fixture


def call(app: Any, method: str, path: str, **kw: Any) -> httpx.Response:
    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kw)

    return asyncio.run(main())


def test_while_warming_up_every_route_answers_503_and_readiness_says_why(tokenizer: Any) -> None:
    lifecycle = Lifecycle()
    lifecycle.step = "warming up: one prefill of 4096 tokens"
    for method, path in (("GET", "/health"), ("POST", "/generate"), ("GET", "/info")):
        response = call(lifecycle, method, path)
        assert response.status_code == 503
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        body = response.json()
        assert body["error_type"] == "unavailable" and "prefill of 4096" in body["error"]
    ready = call(lifecycle, "GET", "/ready")
    assert ready.status_code == 503
    assert ready.json()["ready"] is False and ready.json()["reason"] == "warming_up"

    app, _, _ = build(tokenizer)
    lifecycle.serve(app)
    assert call(lifecycle, "GET", "/ready").json() == {"ready": True, "reason": None}
    assert call(lifecycle, "POST", "/generate", json={"inputs": "hello"}).status_code == 200


def test_draining_answers_503_with_retry_after_while_in_flight_requests_finish(
    tokenizer: Any,
) -> None:
    async def main() -> None:
        app, backend, _ = build(tokenizer, FakeBackend(hang=True))
        lifecycle = Lifecycle()
        lifecycle.serve(app)
        transport = httpx.ASGITransport(app=lifecycle)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            running = asyncio.ensure_future(
                client.post("/generate", json={"inputs": "hello"}, timeout=5))
            await backend.scheduled.wait()
            assert lifecycle.in_flight == 1
            lifecycle.drain()
            refused = await client.post("/generate", json={"inputs": "hello"})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == str(RETRY_AFTER_S)
            assert refused.json()["error"] == "the server is shutting down"
            ready = await client.get("/ready")
            assert ready.status_code == 503 and ready.json()["reason"] == "draining"
            assert lifecycle.in_flight == 1  # the one in flight is still served
            running.cancel()

    asyncio.run(main())


class StalledBackend(FakeBackend):
    def readiness(self) -> str | None:
        return "engine_stalled"


@pytest.mark.parametrize(
    ("backend", "status", "reason"),
    [(FakeBackend(), 200, None), (StalledBackend(), 503, "engine_stalled")],
)
def test_readiness_reports_the_engine(tokenizer: Any, backend: FakeBackend, status: int,
                                      reason: str | None) -> None:
    app, _, _ = build(tokenizer, backend)
    response = TestClient(app).get("/ready")
    assert response.status_code == status and response.json()["reason"] == reason


def test_a_shard_that_fails_its_health_check_is_unreachable(tokenizer: Any) -> None:
    backend = FakeBackend()
    backend.healthy = False
    app, _, _ = build(tokenizer, backend)
    client = TestClient(app)
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["reason"] == "shard_unreachable"
    assert response.json()["error_type"] == "unavailable"
    assert client.get("/health").status_code == 503  # TGI's meaning is kept


def test_the_limits_table_labels_each_value_by_its_source() -> None:
    settings = SchedulerSettings(max_batch_prefill_tokens=512, max_batch_total_tokens=9000,
                                 max_input_tokens=1000, max_total_tokens=2000)
    defaults = limits_table(Config(), settings)
    rows = {line.split()[0]: line.split() for line in defaults.splitlines()[1:]}
    assert rows["max_input_tokens"][2] == "warmup"
    assert rows["max_batch_prefill_tokens"][2] == "default"
    assert rows["max_concurrent_requests"][2] == "default"
    given = dataclasses.replace(Config(), max_input_tokens=1000, kv_cache_memory=2**26,
                                max_concurrent_requests=7, max_batch_prefill_tokens=512)
    table = limits_table(given, settings)
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert rows["max_input_tokens"][2] == "flag"
    assert rows["max_total_tokens"][2] == "warmup"
    assert rows["max_batch_total_tokens"][3] == "flag"  # "(KV)" is part of the name
    assert rows["max_concurrent_requests"][1:3] == ["7", "flag"]
    assert rows["max_batch_prefill_tokens"][2] == "flag"
