"""Deadlines, the step watchdog and request terms: latency protected before and after queueing."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace
from typing import Any

import pytest

from tests.unit import test_native_api
from tests.unit.test_scheduler import FakeShardClient, collect, make, req, run
from tgserve.router.core.admission import StepPace, admit
from tgserve.router.core.watchdog import StepWatch, Watchdog, WatchdogSettings
from tgserve.router.errors import ValidationError, error_info
from tgserve.router.terms import RequestTerms, TermsPolicy
from tgserve.router.types import (
    DeadlineExceededError,
    DeadlineUnreachableError,
    EndEvent,
    OverloadedError,
)

tokenizer = test_native_api.tokenizer  # the fixture, for the HTTP tests below

# ---- the estimate ------------------------------------------------------------------------------


def test_nothing_is_refused_before_a_step_was_measured() -> None:
    verdict = admit(StepPace(), remaining=0.001, tokens_ahead=10**6, own_tokens=100,
                    step_tokens=256, running=True)
    assert verdict.admitted and verdict.eta is None


def test_the_eta_counts_prompt_tokens_ahead_and_decode_steps_between() -> None:
    pace = StepPace(prefill_s_per_token=0.01, decode_step_s=0.1)
    # 1000 tokens ahead + 24 own at 10 ms each, and 4 admission steps of 256, each with a decode.
    assert pace.first_token_eta(1000, 24, 256, running=True) == pytest.approx(10.24 + 0.4)
    assert pace.first_token_eta(1000, 24, 256, running=False) == pytest.approx(10.24)


def test_a_request_is_refused_only_when_its_first_token_would_be_late() -> None:
    pace = StepPace(prefill_s_per_token=0.01, decode_step_s=0.1)
    late = admit(pace, remaining=5.0, tokens_ahead=1000, own_tokens=24, step_tokens=256,
                 running=True)
    assert not late.admitted
    assert late.retry_after == pytest.approx(10.0 + 0.4)  # when the queue ahead has drained
    assert admit(pace, remaining=11.0, tokens_ahead=1000, own_tokens=24, step_tokens=256,
                 running=True).admitted


def test_the_pace_follows_recent_steps() -> None:
    pace = StepPace()
    pace.on_prefill(1.0, 100)
    assert pace.prefill_s_per_token == pytest.approx(0.01)
    for _ in range(30):
        pace.on_prefill(2.0, 100)
    assert pace.prefill_s_per_token == pytest.approx(0.02, rel=0.01)
    pace.on_prefill(5.0, 0)  # a step that computed nothing (all cached) says nothing of the rate
    assert pace.prefill_s_per_token == pytest.approx(0.02, rel=0.01)


# ---- the scheduler with deadlines ---------------------------------------------------------------


def with_deadline(input_length: int, max_new: int, seconds: float) -> Any:
    return RequestTerms(deadline=time.monotonic() + seconds).apply(req(input_length, max_new))


def test_a_late_request_is_refused_at_once_and_never_queued() -> None:
    async def main() -> None:
        scheduler, client = make()  # not started: whatever is queued stays queued
        scheduler.pace = StepPace(prefill_s_per_token=1.0)
        ahead = scheduler.schedule(req(10, 2))
        waiting = asyncio.ensure_future(collect(ahead))
        await asyncio.sleep(0)
        assert len(scheduler.queue) == 1
        with pytest.raises(DeadlineUnreachableError) as refused:
            await collect(scheduler.schedule(with_deadline(5, 2, seconds=3.0)))
        assert len(scheduler.queue) == 1  # the refused one never joined
        assert refused.value.retry_after == pytest.approx(10.0)
        assert isinstance(refused.value, OverloadedError)  # a 429, as TGI's overload
        info = error_info(refused.value)
        assert (info.status, info.error_type) == (429, "overloaded")
        assert info.headers() == {"retry-after": "10"}
        # With time enough, the same request is queued.
        scheduler.start()
        events = await collect(scheduler.schedule(with_deadline(5, 2, seconds=60.0)))
        assert isinstance(events[-1], EndEvent)
        await waiting
        await scheduler.stop()
        assert client.prefills()  # the scheduler ran the admitted ones

    run(main())


def test_a_request_whose_deadline_passes_in_the_queue_never_reaches_the_shard() -> None:
    async def main() -> None:
        scheduler, client = make()  # not started: the request can only wait
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as expired:
            await collect(scheduler.schedule(with_deadline(5, 2, seconds=0.05)))
        assert 0.05 <= time.monotonic() - started < 5
        info = error_info(expired.value)
        assert (info.status, info.error_type) == (503, "deadline_exceeded")
        assert info.headers() is not None and "retry-after" in info.headers()  # type: ignore[operator]
        scheduler.start()
        events = await collect(scheduler.schedule(req(3, 1)))  # the next one runs
        await scheduler.stop()
        assert isinstance(events[-1], EndEvent)
        assert len(client.prefills()) == 1 and len(client.prefills()[0]) == 1
        assert scheduler.allocator.used_blocks == 0 and len(scheduler.queue) == 0

    run(main())


def test_a_request_already_in_a_batch_is_not_cut_off_by_its_deadline() -> None:
    class SlowShard(FakeShardClient):
        async def decode(self, batches: Any, metadata: Any = None,
                         decode_ahead: bool = False) -> Any:
            await asyncio.sleep(0.02)
            return await super().decode(batches, metadata, decode_ahead)

    async def main() -> None:
        scheduler, client = make()
        client.__class__ = SlowShard
        scheduler.start()
        started = time.monotonic()
        events = await collect(scheduler.schedule(with_deadline(5, 30, seconds=0.2)))
        await scheduler.stop()
        assert time.monotonic() - started > 0.2  # it ran past its deadline...
        end = events[-1]  # ...to its end: the deadline bounds the wait for the first token
        assert isinstance(end, EndEvent) and end.generated_text.generated_tokens == 30

    run(main())


# ---- the watchdog -------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_step_far_slower_than_recent_ones_of_its_size_is_a_stall(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    dog = Watchdog(WatchdogSettings(factor=20, floor_s=1.0, unknown_s=60), clock=clock)
    step = StepWatch("decode", 8, (3, 4), (7,))
    for _ in range(5):
        with dog.watching(step):
            clock.now += 0.1
    assert dog.limit(step) == pytest.approx(2.0)
    # A smaller step of the same method borrows the bigger bucket's history; an unseen one
    # gets the generous limit.
    assert dog.limit(StepWatch("decode", 2, (), ())) == pytest.approx(2.0)
    assert dog.limit(StepWatch("decode", 64, (), ())) == 60
    assert dog.limit(StepWatch("prefill", 8, (), ())) == 60
    with caplog.at_level(logging.ERROR, "tgserve.router.watchdog"), dog.watching(step):
        clock.now += 1.9
        assert dog.check() is None
        clock.now += 0.2
        stall = dog.check()
        assert stall is not None and stall.step == step
        assert "decode step of 8 rows (batch 7)" in caplog.text
        assert "Requests in it: 3, 4" in caplog.text
        assert dog.check() is stall  # logged once
    assert dog.stalled is None  # the step ended: healthy again


def test_a_hung_step_makes_the_server_unhealthy_until_it_ends() -> None:
    gate = asyncio.Event()

    class HangingShard(FakeShardClient):
        async def decode(self, batches: Any, metadata: Any = None,
                         decode_ahead: bool = False) -> Any:
            if len(self.decodes()) >= 3:
                await gate.wait()  # a hung kernel, a deadlocked collective
            return await super().decode(batches, metadata, decode_ahead)

    async def main() -> None:
        scheduler, client = make()
        client.__class__ = HangingShard
        scheduler.watchdog.settings = WatchdogSettings(factor=5, floor_s=0.05, unknown_s=0.2,
                                                       interval_s=0.01)
        scheduler.start()
        running = asyncio.ensure_future(collect(scheduler.schedule(req(3, 10))))
        while scheduler.watchdog.stalled is None:
            await asyncio.sleep(0.01)
        assert scheduler.readiness() == "engine_stalled"
        calls = len(client.calls)
        assert await scheduler.health() is False
        assert len(client.calls) == calls  # no RPC queued behind the hung step
        gate.set()
        events = await running
        assert isinstance(events[-1], EndEvent)
        assert scheduler.watchdog.stalled is None and scheduler.readiness() is None
        assert await scheduler.health() is True
        await scheduler.stop()

    run(main())


# ---- request terms ------------------------------------------------------------------------------


def test_the_header_sets_the_deadline_and_the_flag_the_default() -> None:
    policy = TermsPolicy(default_timeout=30.0)
    assert policy.read({}, now=10.0).deadline == 40.0
    assert policy.read({"x-request-timeout": "2.5"}, now=10.0).deadline == 12.5
    assert TermsPolicy().read({}, now=10.0).deadline is None
    for bad in ("0", "-1", "abc", "nan", "inf", ""):
        with pytest.raises(ValidationError, match="X-Request-Timeout"):
            policy.read({"x-request-timeout": bad})


def test_a_salt_from_the_api_key_keeps_tenants_apart() -> None:
    policy = TermsPolicy(salt_from_key=True)
    alice = policy.read({"authorization": "Bearer alice"}).apply(req(3, 1))
    bob = policy.read({"authorization": "Bearer bob"}).apply(req(3, 1))
    assert alice.cache_salt and bob.cache_salt and alice.cache_salt != bob.cache_salt
    assert b"alice" not in alice.cache_salt  # a digest, never the key itself
    again = policy.read({"authorization": "Bearer alice"}).apply(req(3, 1))
    assert again.cache_salt == alice.cache_salt
    # The key's digest goes before the request's own salt.
    own = policy.read({"authorization": "Bearer alice"}).apply(replace(req(3, 1), cache_salt=b"x"))
    assert own.cache_salt == alice.cache_salt + b"x"
    assert TermsPolicy().read({"authorization": "Bearer alice"}).apply(req(3, 1)).cache_salt == b""


# ---- over HTTP ----------------------------------------------------------------------------------


def test_both_apis_carry_the_deadline_header_and_the_cache_salt(tokenizer: Any) -> None:
    from fastapi.testclient import TestClient

    from tests.unit.test_native_api import build
    from tests.unit.test_openai_api import client_for

    app, backend, _ = build(tokenizer, request_timeout=30.0, cache_salt_from_api_key=True)
    client = TestClient(app)
    before = time.monotonic()
    ok = client.post("/generate", headers={"X-Request-Timeout": "2", "Authorization": "Bearer k"},
                     json={"inputs": "hello", "parameters": {"cache_salt": "s1"}})
    assert ok.status_code == 200, ok.text
    client.post("/generate_stream", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
    first, streamed = backend.requests
    assert first.deadline is not None and before + 2 <= first.deadline < time.monotonic() + 2
    assert first.cache_salt.endswith(b"s1") and len(first.cache_salt) == 16 + 2
    assert streamed.deadline is not None and streamed.deadline >= before + 30  # the default
    bad = client.post("/generate", headers={"X-Request-Timeout": "soon"}, json={"inputs": "hi"})
    assert bad.status_code == 422 and "X-Request-Timeout" in bad.json()["error"]
    assert client.post("/generate", json={"inputs": "hi", "parameters": {"cache_salt": ""}}
                       ).status_code == 422

    openai, backend = client_for(tokenizer)
    chat = openai.post("/v1/chat/completions", headers={"X-Request-Timeout": "5"},
                       json={"messages": [{"role": "user", "content": "hello"}], "n": 2,
                             "cache_salt": "tenant-a", "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    assert len(backend.requests) == 2
    assert all(r.cache_salt == b"tenant-a" and r.deadline is not None for r in backend.requests)
    bad = openai.post("/v1/completions", headers={"X-Request-Timeout": "-3"},
                      json={"prompt": "hello", "max_tokens": 2})
    assert bad.status_code == 400 and "X-Request-Timeout" in bad.json()["error"]["message"]


def test_late_and_expired_requests_get_their_status_and_retry_after(tokenizer: Any) -> None:
    from fastapi.testclient import TestClient

    from tests.unit.test_native_api import FakeBackend, build
    from tests.unit.test_openai_api import client_for

    for error, status in ((DeadlineUnreachableError(12.0, 3.0, 9.2), 429),
                          (DeadlineExceededError(3.0, 4.0), 503)):
        app, _, _ = build(tokenizer, FakeBackend(lambda r, c, e=error: [e]))
        response = TestClient(app).post("/generate", json={"inputs": "hello"})
        assert response.status_code == status
        assert response.headers["retry-after"] == str(math.ceil(error.retry_after))
        assert response.json()["error_type"] in ("overloaded", "deadline_exceeded")
        openai, _ = client_for(tokenizer, lambda r, c, e=error: [e])
        response = openai.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
        assert response.status_code == status
        assert response.headers["retry-after"] == str(math.ceil(error.retry_after))
