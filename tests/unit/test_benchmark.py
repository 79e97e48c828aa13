"""Tests of the load generator: statistics, SSE token counting against a fake server, the closed
loop, RSS sampling, reports and the CLI. No timing assertions."""

from __future__ import annotations

import argparse
import ast
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np
import pytest
import uvicorn

from tgserve.benchmark import cli, client, prompts, report, rss, runner, stats
from tgserve.benchmark.client import Endpoint, GenerationSettings, SseEvent
from tgserve.benchmark.stats import RequestRecord

# --------------------------------------------------------------------------------------------
# A fake server speaking both SSE dialects.


@dataclass
class FakeServer:
    """An ASGI app streaming `max_tokens` tokens per request, recording load and payloads."""

    tokens_per_chunk: int = 1  # > 1 mimics a server that packs tokens into one chunk
    send_usage: bool = True
    keepalive: bool = True
    special_token_at: int | None = None  # index of a token that decodes to ""
    final_empty_chunk: bool = False  # llama.cpp-like end marker with empty text
    error_after: int | None = None  # send an in-band error after this many tokens
    http_status: int = 200
    delay_s: float = 0.001
    payloads: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        body = await _read_body(receive)
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            await _send_json(send, {"object": "list", "data": [{"id": "fake-model"}]})
            return
        payload = json.loads(body)
        self.payloads.append(payload)
        if self.http_status != 200:
            await _send_json(send, {"error": "bad request"}, self.http_status)
            return
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            events = (
                self._openai(payload) if scope["path"] == "/v1/completions" else self._tgi(payload)
            )
            await self._stream(send, events)
        finally:
            self.in_flight -= 1

    async def _stream(self, send: Any, events: Iterator[str]) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for event in events:
            await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await asyncio.sleep(self.delay_s)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _texts(self, num_tokens: int) -> list[str]:
        return ["" if i == self.special_token_at else f" t{i}" for i in range(num_tokens)]

    def _openai(self, payload: dict[str, Any]) -> Iterator[str]:
        num_tokens = payload["max_tokens"]
        texts = self._texts(num_tokens)
        chunks = [
            "".join(texts[i : i + self.tokens_per_chunk])
            for i in range(0, num_tokens, self.tokens_per_chunk)
        ]
        for i, text in enumerate(chunks):
            if self.keepalive:
                yield ": keep-alive\n\n"
            if self.error_after is not None and i == self.error_after:
                yield _sse({"error": {"message": "model exploded", "http_status_code": 422}})
                yield "data: [DONE]\n\n"
                return
            last = i == len(chunks) - 1 and not self.final_empty_chunk
            yield _sse(_completion_chunk(text, "length" if last else None))
        if self.final_empty_chunk:
            yield _sse(_completion_chunk("", "length"))
        if self.send_usage and payload.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": 5, "completion_tokens": num_tokens, "total_tokens": 0}
            yield _sse({"object": "text_completion", "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    def _tgi(self, payload: dict[str, Any]) -> Iterator[str]:
        num_tokens = payload["parameters"]["max_new_tokens"]
        for i, text in enumerate(self._texts(num_tokens)):
            if self.keepalive:
                yield ":\n\n"
            if self.error_after is not None and i == self.error_after:
                yield _sse(
                    {"error": "Request failed during generation", "error_type": "generation"}
                )
                return
            last = i == num_tokens - 1
            token = {"id": i, "text": text, "logprob": -1.0, "special": text == ""}
            details = {"finish_reason": "length", "generated_tokens": num_tokens} if last else None
            event = {
                "index": i + 1,
                "token": token,
                "generated_text": "all" if last else None,
                "details": details,
            }
            yield _sse(event)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _completion_chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return {"object": "text_completion", "model": "fake", "choices": [choice]}


async def _read_body(receive: Any) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def _send_json(send: Any, obj: Any, status: int = 200) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(obj).encode()})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _send_one(
    fake: FakeServer, api: str, max_new_tokens: int = 8, include_usage: bool = True
) -> RequestRecord:
    settings = GenerationSettings(max_new_tokens=max_new_tokens, include_usage=include_usage)
    endpoint = Endpoint(name="fake", url="http://fake", api=api, model="m")
    prompt = prompts.make_prompts(1, seed=3)[0]

    async def go() -> RequestRecord:
        transport = httpx.ASGITransport(app=fake)
        async with client.make_client(endpoint.url, 30.0, 4, transport) as http:
            return await client.send_request(http, endpoint, prompt, settings)

    return asyncio.run(go())


class LiveServer:
    """A real uvicorn on 127.0.0.1 with a free port, in a thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="error", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> Self:
        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            threading.Event().wait(0.01)
        assert self.server.started, "uvicorn did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.sock.close()


# --------------------------------------------------------------------------------------------
# Statistics.


@pytest.mark.parametrize("size", [1, 2, 3, 7, 10, 101])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 99, 99.9, 100])
def test_percentile_matches_numpy(size: int, q: float) -> None:
    rng = random.Random(size * 1000 + int(q * 10))
    values = [rng.expovariate(3.0) for _ in range(size)]
    assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_interpolates_and_rejects_bad_input() -> None:
    assert stats.percentile([4.0, 1.0, 3.0, 2.0], 50) == pytest.approx(2.5)
    assert stats.percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_per_request_metrics_from_synthetic_timeline() -> None:
    record = RequestRecord(prompt_index=0, start=10.0, end=11.2, output_tokens=4)
    record.chunk_times = [10.5, 10.6, 10.8, 11.1]
    assert stats.ttft(record) == pytest.approx(0.5)
    assert stats.itl(record) == pytest.approx([0.1, 0.2, 0.3])
    assert stats.e2e(record) == pytest.approx(1.2)
    assert stats.tpot(record) == pytest.approx((1.2 - 0.5) / 3)


def test_tpot_and_ttft_undefined_without_enough_tokens() -> None:
    empty = RequestRecord(prompt_index=0, start=0.0, end=1.0)
    assert stats.ttft(empty) is None and stats.tpot(empty) is None and stats.itl(empty) == []
    single = RequestRecord(prompt_index=0, start=0.0, end=1.0, chunk_times=[0.4], output_tokens=1)
    assert stats.ttft(single) == pytest.approx(0.4)
    assert stats.tpot(single) is None


def test_tpot_uses_token_count_not_chunk_count() -> None:
    # Two chunks carrying 5 tokens (a server packing tokens): 4 gaps after the first token.
    record = RequestRecord(0, start=0.0, end=2.0, chunk_times=[1.0, 2.0], output_tokens=5)
    assert stats.tpot(record) == pytest.approx(0.25)


def test_aggregate_one_level() -> None:
    records = [
        RequestRecord(0, start=0.0, end=2.0, chunk_times=[0.5, 1.0, 2.0], output_tokens=3),
        RequestRecord(1, start=1.0, end=4.0, chunk_times=[2.0, 3.0, 4.0], output_tokens=3),
        RequestRecord(2, start=2.0, end=3.0, error="HTTP 503: busy"),
        RequestRecord(3, start=2.5, end=3.0, error="HTTP 503: busy"),
    ]
    level = stats.aggregate(records, concurrency=2)
    assert level.num_requests == 4 and level.num_errors == 2
    assert level.duration_s == pytest.approx(4.0)
    assert level.requests_per_s == pytest.approx(2 / 4.0)
    assert level.output_tokens_per_s == pytest.approx(6 / 4.0)
    assert level.total_output_tokens == 6
    assert level.ttft_s is not None and level.ttft_s.count == 2
    assert level.ttft_s.mean == pytest.approx(0.75)
    assert level.itl_s is not None
    assert level.itl_s.count == 4
    assert level.itl_s.p50 == pytest.approx(float(np.percentile([0.5, 1.0, 1.0, 1.0], 50)))
    assert level.e2e_s is not None and level.e2e_s.p99 == pytest.approx(
        float(np.percentile([2.0, 3.0], 99))
    )
    assert level.errors == ("HTTP 503: busy",)
    assert json.loads(json.dumps(level.to_dict()))["num_errors"] == 2


def test_aggregate_with_only_errors_has_no_latencies() -> None:
    level = stats.aggregate([RequestRecord(0, start=0.0, end=1.0, error="x")], concurrency=1)
    assert level.ttft_s is None and level.e2e_s is None
    assert level.requests_per_s == 0.0 and level.num_errors == 1


# --------------------------------------------------------------------------------------------
# Prompts.


def test_prompts_are_deterministic_and_sized() -> None:
    first = prompts.make_prompts(64, seed=0)
    assert [p.text for p in first] == [p.text for p in prompts.make_prompts(64, seed=0)]
    assert [p.text for p in first] != [p.text for p in prompts.make_prompts(64, seed=1)]
    assert [p.index for p in first] == list(range(64))
    assert len({p.text for p in first}) == 64
    lengths = [p.estimated_tokens for p in first]
    assert min(lengths) >= 100 and max(lengths) <= 300
    assert 160 <= sum(lengths) / len(lengths) <= 200
    vocabulary = {w.lower() for w in prompts.WORDS}
    for prompt in first[:5]:
        words = prompt.text.replace(".", " ").replace(",", " ").split()
        assert {w.lower() for w in words} <= vocabulary
        assert len(words) <= prompt.estimated_tokens


def test_prompt_count_is_an_argument() -> None:
    assert len(prompts.make_prompts(3, seed=7)) == 3
    with pytest.raises(ValueError):
        prompts.make_prompts(0)


# --------------------------------------------------------------------------------------------
# SSE parsing and token counting.


def _events(lines: list[str]) -> list[SseEvent]:
    async def source() -> AsyncIterator[str]:
        for line in lines:
            yield line

    async def collect() -> list[SseEvent]:
        return [event async for event in client.iter_sse(source())]

    return asyncio.run(collect())


def test_iter_sse_skips_comments_and_joins_data_lines() -> None:
    lines = [": keep-alive", "", 'data: {"a":', "data: 1}", "", "event: error", "data:boom\r", ""]
    lines += ["data: [DONE]"]  # no blank line at the end of the stream
    assert _events(lines) == [
        SseEvent(None, '{"a":\n1}'),
        SseEvent("error", "boom"),
        SseEvent(None, "[DONE]"),
    ]


def test_parse_openai_event_kinds() -> None:
    parse = client.parse_openai_event
    assert parse(SseEvent(None, "[DONE]")).done
    assert parse(SseEvent(None, json.dumps(_completion_chunk(" a", None)))).tokens == 1
    assert parse(SseEvent(None, json.dumps(_completion_chunk("", None)))).tokens == 1
    assert parse(SseEvent(None, json.dumps(_completion_chunk("", "length")))).tokens == 0
    usage = parse(SseEvent(None, json.dumps({"choices": [], "usage": {"completion_tokens": 9}})))
    assert usage.tokens == 0 and usage.reported_tokens == 9
    assert parse(SseEvent(None, '{"error": {"message": "bad"}}')).error == "bad"
    assert parse(SseEvent("error", "overloaded")).error == "overloaded"
    assert "invalid JSON" in (parse(SseEvent(None, "{oops")).error or "")


def test_parse_tgi_event_kinds() -> None:
    parse = client.parse_tgi_event
    token = {"index": 1, "token": {"id": 1, "text": "a"}, "generated_text": None, "details": None}
    info = parse(SseEvent(None, json.dumps(token)))
    assert info.tokens == 1 and not info.done and info.reported_tokens is None
    last = {**token, "generated_text": "a", "details": {"generated_tokens": 1}}
    info = parse(SseEvent(None, json.dumps(last)))
    assert info.done and info.reported_tokens == 1
    assert parse(SseEvent(None, '{"error": "busy", "error_type": "overloaded"}')).error == "busy"


def test_openai_stream_counts_tokens_and_sends_payload() -> None:
    fake = FakeServer(special_token_at=2)
    record = _send_one(fake, "openai", max_new_tokens=7)
    assert record.ok, record.error
    assert record.output_tokens == 7
    assert len(record.chunk_times) == 7  # the special token's empty chunk still counts
    assert record.start <= record.chunk_times[0] <= record.end
    payload = fake.payloads[0]
    assert payload["max_tokens"] == 7 and payload["ignore_eos"] is True
    assert payload["stream"] is True and payload["temperature"] == 0
    assert payload["stream_options"] == {"include_usage": True} and payload["model"] == "m"


def test_openai_without_usage_counts_token_chunks_only() -> None:
    fake = FakeServer(send_usage=False, final_empty_chunk=True)
    record = _send_one(fake, "openai", max_new_tokens=5, include_usage=False)
    assert record.ok
    assert record.output_tokens == 5 and len(record.chunk_times) == 5
    assert "stream_options" not in fake.payloads[0]


def test_openai_prefers_usage_over_chunk_count() -> None:
    fake = FakeServer(tokens_per_chunk=3)
    record = _send_one(fake, "openai", max_new_tokens=9)
    assert len(record.chunk_times) == 3
    assert record.output_tokens == 9


def test_openai_in_band_error_is_recorded() -> None:
    record = _send_one(FakeServer(error_after=2), "openai", max_new_tokens=6)
    assert not record.ok and record.error == "model exploded"
    assert len(record.chunk_times) == 2


def test_http_error_status_is_recorded() -> None:
    record = _send_one(FakeServer(http_status=422), "openai")
    assert record.error is not None and record.error.startswith("HTTP 422")


def test_tgi_stream_counts_events_and_sends_parameters() -> None:
    fake = FakeServer(special_token_at=0)
    record = _send_one(fake, "tgi", max_new_tokens=6)
    assert record.ok and record.output_tokens == 6 and len(record.chunk_times) == 6
    parameters = fake.payloads[0]["parameters"]
    assert parameters["max_new_tokens"] == 6 and parameters["ignore_eos"] is True
    assert isinstance(fake.payloads[0]["inputs"], str)


def test_tgi_error_event_is_recorded() -> None:
    record = _send_one(FakeServer(error_after=3), "tgi", max_new_tokens=6)
    assert record.error == "Request failed during generation"
    assert len(record.chunk_times) == 3


@pytest.mark.parametrize("api", ["openai", "tgi"])
def test_streaming_over_a_real_socket(api: str) -> None:
    settings = GenerationSettings(max_new_tokens=5)
    prompt = prompts.make_prompts(1)[0]
    with LiveServer(FakeServer()) as live:
        endpoint = Endpoint(name="live", url=live.url, api=api, model="m")

        async def go() -> RequestRecord:
            async with client.make_client(live.url, 30.0, 2) as http:
                assert await client.discover_model(http) == "fake-model"
                return await client.send_request(http, endpoint, prompt, settings)

        record = asyncio.run(go())
    assert record.ok, record.error
    assert record.output_tokens == 5
    assert record.chunk_times == sorted(record.chunk_times)
    assert record.start <= record.chunk_times[0] and record.chunk_times[-1] <= record.end


def test_unreachable_server_is_an_error_not_an_exception() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening
        endpoint = Endpoint(name="gone", url=url, api="tgi")

        async def go() -> RequestRecord:
            async with client.make_client(url, 5.0, 1) as http:
                return await client.send_request(
                    http, endpoint, prompts.make_prompts(1)[0], GenerationSettings()
                )

        record = asyncio.run(go())
    assert record.error is not None and "ConnectError" in record.error


# --------------------------------------------------------------------------------------------
# Runner.


def _asgi(fakes: dict[str, FakeServer]) -> runner.TransportFactory:
    return lambda endpoint: httpx.ASGITransport(app=fakes[endpoint.name])


def _config(names: list[str], **kwargs: Any) -> runner.BenchmarkConfig:
    servers = tuple(
        runner.ServerSpec(Endpoint(name=n, url=f"http://{n}", api="openai")) for n in names
    )
    kwargs.setdefault("settings", GenerationSettings(max_new_tokens=4))
    return runner.BenchmarkConfig(servers=servers, **kwargs)


def test_closed_loop_sends_exactly_num_prompts_with_bounded_concurrency() -> None:
    fake = FakeServer()
    config = _config(["a"], concurrency=(4,), num_prompts=11, warmup_requests=0)
    results = asyncio.run(runner.run_benchmark(config, _asgi({"a": fake})))
    assert len(fake.payloads) == 11
    assert fake.max_in_flight == 4
    level = results[0].levels[0]
    assert level.stats.num_requests == 11 and level.stats.num_errors == 0
    assert level.stats.total_output_tokens == 11 * 4
    texts = {p.text for p in prompts.level_prompts(11, seed=0, concurrency=4)}
    assert {p["prompt"] for p in fake.payloads} == texts


def test_levels_and_warmup_never_share_a_prompt() -> None:
    """Otherwise a server with a prefix cache would answer later levels from it."""
    fake = FakeServer()
    config = _config(["a", "b"], concurrency=(1, 2), num_prompts=3, warmup_requests=2)
    asyncio.run(runner.run_benchmark(config, _asgi({"a": fake, "b": fake})))
    sent = [p["prompt"] for p in fake.payloads]
    sets = {level: {p.text for p in prompts.level_prompts(3, 0, level)} for level in (0, 1, 2)}
    assert sets[1] | sets[2] <= set(sent) <= sets[0] | sets[1] | sets[2]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])
    # Both servers got the same prompts at each level: every measured prompt was sent twice.
    assert all(sent.count(text) == 2 for text in sets[1] | sets[2])


def test_warmup_requests_come_first_and_are_not_measured() -> None:
    fake = FakeServer()
    config = _config(["a"], concurrency=(1, 2), num_prompts=3, warmup_requests=2)
    results = asyncio.run(runner.run_benchmark(config, _asgi({"a": fake})))
    assert len(fake.payloads) == 2 + 3 + 3
    assert fake.payloads[0]["model"] == "fake-model"  # discovered from /v1/models
    assert [lv.stats.num_requests for lv in results[0].levels] == [3, 3]


def test_failed_warmup_stops_the_benchmark() -> None:
    config = _config(["a"], concurrency=(1,), num_prompts=2, warmup_requests=1)
    with pytest.raises(runner.BenchmarkError):
        asyncio.run(runner.run_benchmark(config, _asgi({"a": FakeServer(http_status=500)})))


def test_level_order_alternates_servers() -> None:
    a, b = (runner.ServerSpec(Endpoint(name=n, url="http://x")) for n in "ab")
    order = [(c, s.endpoint.name) for c, s in runner.level_order([a, b], [1, 4, 16])]
    assert order == [(1, "a"), (1, "b"), (4, "b"), (4, "a"), (16, "a"), (16, "b")]


def test_two_servers_in_one_run() -> None:
    fakes = {"a": FakeServer(), "b": FakeServer()}
    config = _config(["a", "b"], concurrency=(1, 2), num_prompts=4, warmup_requests=0)
    seen: list[tuple[str, int]] = []

    def on_level(level: runner.LevelResult) -> None:
        seen.append((level.server, level.stats.concurrency))

    results = asyncio.run(runner.run_benchmark(config, _asgi(fakes), on_level))
    assert seen == [("a", 1), ("b", 1), ("b", 2), ("a", 2)]
    assert [r.name for r in results] == ["a", "b"]
    assert all(len(f.payloads) == 8 for f in fakes.values())


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        _config(["a", "a"])
    with pytest.raises(ValueError):
        _config(["a"], concurrency=(0,))
    with pytest.raises(ValueError):
        Endpoint(name="x", url="http://x", api="grpc")


# --------------------------------------------------------------------------------------------
# RSS.


def _fake_proc(root: Path, table: dict[int, tuple[int, int, int]]) -> Path:
    """pid -> (ppid, VmRSS kB, VmHWM kB)."""
    for pid, (ppid, rss_kb, hwm_kb) in table.items():
        (root / str(pid)).mkdir()
        (root / str(pid) / "stat").write_text(f"{pid} (odd) name) S {ppid} 1 1 0\n")
        status = f"Name:\tx\nVmHWM:\t{hwm_kb} kB\nVmRSS:\t{rss_kb} kB\nThreads:\t1\n"
        (root / str(pid) / "status").write_text(status)
    (root / "self").mkdir()
    return root


def test_tree_memory_sums_descendants_only(tmp_path: Path) -> None:
    proc = _fake_proc(
        tmp_path, {1: (0, 1, 1), 10: (1, 100, 150), 11: (10, 20, 30), 12: (11, 3, 4), 13: (1, 7, 7)}
    )
    assert sorted(rss.process_tree(10, proc)) == [10, 11, 12]
    memory = rss.sample_tree(10, proc)
    assert memory.rss_bytes == (100 + 20 + 3) * 1024
    assert memory.hwm_bytes == (150 + 30 + 4) * 1024
    assert memory.num_processes == 3


def test_process_tree_finds_a_real_child() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    try:
        assert child.pid in rss.process_tree(os.getpid())
        sampler = rss.RssSampler(os.getpid(), interval_s=0.01)
        with sampler:
            pass
        assert sampler.peak_bytes >= rss.read_status_kib(child.pid).get("VmRSS", 0) * 1024 > 0
        assert sampler.peak_hwm_bytes >= sampler.peak_bytes
    finally:
        child.communicate(b"")


def test_sampler_rejects_missing_pid() -> None:
    with pytest.raises(ValueError):
        rss.RssSampler(2**22 + 12345).start()


# --------------------------------------------------------------------------------------------
# Reports.


def _level(server: str, concurrency: int, tok_s: float, ttft: float, rss_mib: int) -> Any:
    summary = stats.Summary(count=1, mean=ttft, p50=ttft, p90=ttft, p99=ttft)
    level_stats = stats.LevelStats(
        concurrency=concurrency,
        num_requests=4,
        num_errors=0,
        duration_s=1.0,
        requests_per_s=tok_s / 10,
        output_tokens_per_s=tok_s,
        total_output_tokens=int(tok_s),
        ttft_s=summary,
        itl_s=summary,
        tpot_s=None,
        e2e_s=summary,
    )
    return runner.LevelResult(server, level_stats, peak_rss_bytes=rss_mib * report.MIB)


def _result(name: str, levels: list[Any]) -> runner.ServerResult:
    return runner.ServerResult(runner.ServerSpec(Endpoint(name=name, url="http://x")), levels)


def test_ratios_compare_shared_levels() -> None:
    first = _result("ours", [_level("ours", 1, 200, 0.1, 300), _level("ours", 4, 600, 0.2, 310)])
    second = _result("peer", [_level("peer", 1, 100, 0.4, 600)])
    rows = report.compute_ratios(first, second)
    assert len(rows) == 1 and rows[0]["concurrency"] == 1
    assert rows[0]["output_tokens_per_s"] == pytest.approx(2.0)
    assert rows[0]["ttft_p50"] == pytest.approx(0.25)
    assert rows[0]["peak_rss"] == pytest.approx(0.5)
    assert rows[0]["tpot_p50"] is None
    text = report.format_ratios(first, second)
    assert "ours / peer" in text and "2.00x" in text and "0.25x" in text


def test_table_has_a_row_per_level() -> None:
    results = [
        _result("ours", [_level("ours", 1, 200, 0.1, 300), _level("ours", 4, 600, 0.2, 310)])
    ]
    lines = report.format_table(results).splitlines()
    assert len(lines) == 2 + 2
    assert "600.0" in lines[3] and "300" in lines[2] and "100.0/100.0/100.0" in lines[2]


def test_report_writes_json_and_plot(tmp_path: Path) -> None:
    fakes = {"ours": FakeServer(), "peer": FakeServer()}
    config = _config(["ours", "peer"], concurrency=(1, 2), num_prompts=3, warmup_requests=0)
    results = asyncio.run(runner.run_benchmark(config, _asgi(fakes)))
    paths = report.write_report(tmp_path / "out", config, results)
    data = json.loads(paths.json.read_text())
    assert [s["name"] for s in data["servers"]] == ["ours", "peer"]
    assert [lv["concurrency"] for lv in data["servers"][0]["levels"]] == [1, 2]
    assert data["servers"][0]["levels"][0]["total_output_tokens"] == 3 * 4
    assert data["config"]["settings"]["max_new_tokens"] == 4
    assert data["ratios"][0]["first"] == "ours" and len(data["ratios"][0]["levels"]) == 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths.png is None
    else:
        assert paths.png is not None and paths.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# CLI.


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_builds_servers_and_config() -> None:
    args = _parse(
        ["--url", "http://h:1/v1/", "--name", "ours", "--server-pid", "12"]
        + ["--peer-url", "http://h:2", "--peer-api", "tgi", "--peer-pid", "34"]
        + ["--concurrency", "1,8", "--no-ignore-eos", "--max-new-tokens", "16"]
    )
    config = cli.build_config(args)
    (ours, peer) = config.servers
    assert ours.endpoint == Endpoint(name="ours", url="http://h:1", api="openai") and ours.pid == 12
    assert peer.endpoint == Endpoint(name="h:2", url="http://h:2", api="tgi") and peer.pid == 34
    assert config.concurrency == (1, 8)
    assert config.settings == GenerationSettings(max_new_tokens=16, ignore_eos=False)
    with pytest.raises(SystemExit):
        _parse(["--url", "http://h", "--concurrency", "1,x"])


def test_cli_runs_against_a_live_fake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with LiveServer(FakeServer()) as first, LiveServer(FakeServer()) as second:
        argv = ["--url", first.url, "--name", "ours", "--peer-url", second.url, "--api", "tgi"]
        argv += ["--concurrency", "1,2", "--num-prompts", "3", "--max-new-tokens", "3"]
        argv += ["--warmup", "1", "--out-dir", str(tmp_path)]
        assert cli.run(_parse(argv)) == 0
    out = capsys.readouterr().out
    assert "ours" in out and "ratios ours /" in out
    data = json.loads((tmp_path / report.JSON_NAME).read_text())
    assert all(lv["num_errors"] == 0 for s in data["servers"] for lv in s["levels"])


def test_cli_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        args = _parse(["--url", f"http://127.0.0.1:{sock.getsockname()[1]}", "--concurrency", "1"])
        assert cli.run(args) == 1
    assert "warmup failed" in capsys.readouterr().err


def test_benchmark_imports_no_server_internals() -> None:
    package = Path(cli.__file__).parent
    forbidden = ("tgserve.router", "tgserve.shard", "tgserve.launcher")
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.startswith(forbidden) for n in names), f"{path.name} imports {names}"


def test_module_entry_point_prints_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tgserve.benchmark", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and "--peer-url" in done.stdout
