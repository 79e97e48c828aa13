"""TGI's native routes against a scripted fake backend: shapes, SSE, errors, auth, disconnects."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tgserve.router.app import create_app
from tgserve.router.infer import Infer
from tgserve.router.settings import RouterSettings
from tgserve.router.streaming import SSEResponse
from tgserve.router.tokenization import RouterTokenizer
from tgserve.router.types import (
    EndEvent,
    FinishReason,
    GeneratedText,
    GenerationError,
    InferEvent,
    PrefillEvent,
    Token,
    TokenEvent,
    ValidRequest,
)

Script = Callable[[ValidRequest, int], list[Any]]


def tok(i: int, text: str, logprob: float = -0.5, special: bool = False) -> Token:
    return Token(i, text, logprob, special)


def end(
    token: Token,
    text: str,
    n: int,
    reason: FinishReason = FinishReason.LENGTH,
    top: list[Token] | None = None,
) -> EndEvent:
    now = time.monotonic()
    return EndEvent(token, top or [], GeneratedText(text, n, reason, None), now, now)


def three_tokens(request: ValidRequest, call: int) -> list[Any]:
    top = [tok(10, " x", -1.0), tok(11, " y", -2.0)][: request.top_n_tokens]
    return [
        PrefillEvent([Token(1, "<s>", None), Token(3, "hello", -1.25)]),
        TokenEvent(tok(4, " world"), top),
        TokenEvent(tok(5, " again"), top),
        end(tok(2, "</s>", -0.25, True), " world again", 3, FinishReason.EOS_TOKEN, top),
    ]


class HangingIterator:
    """A backend stream that is not a generator: only an explicit aclose() reaches it."""

    def __init__(self, backend: FakeBackend) -> None:
        self.backend = backend

    def __aiter__(self) -> HangingIterator:
        return self

    async def __anext__(self) -> InferEvent:
        await asyncio.Event().wait()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.backend.closed += 1


class FakeBackend:
    """Yields scripted events (an Exception in the script is raised); can hang forever after."""

    def __init__(
        self, script: Script = three_tokens, hang: bool = False, iterator_object: bool = False
    ) -> None:
        self.script = script
        self.hang = hang
        self.iterator_object = iterator_object
        self.healthy: bool | Exception = True
        self.requests: list[ValidRequest] = []
        self.closed = 0
        self._scheduled: asyncio.Event | None = None

    @property
    def scheduled(self) -> asyncio.Event:
        if self._scheduled is None:
            self._scheduled = asyncio.Event()
        return self._scheduled

    def schedule(self, request: ValidRequest) -> AsyncIterator[InferEvent]:
        if self.iterator_object:
            self.requests.append(request)
            self.scheduled.set()
            return HangingIterator(self)
        return self._events(request)

    async def _events(self, request: ValidRequest) -> AsyncIterator[InferEvent]:
        call = len(self.requests)
        self.requests.append(request)
        self.scheduled.set()
        try:
            for item in self.script(request, call):
                await asyncio.sleep(0)
                if isinstance(item, Exception):
                    raise item
                yield item
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed += 1

    async def health(self) -> bool:
        if isinstance(self.healthy, Exception):
            raise self.healthy
        return self.healthy


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[RouterTokenizer]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "é": 5}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    router_tokenizer = RouterTokenizer(fast, validation_workers=2)
    yield router_tokenizer
    router_tokenizer.close()


def build(
    tokenizer: RouterTokenizer,
    backend: FakeBackend | None = None,
    info: dict[str, Any] | None = None,
    **settings: Any,
) -> tuple[FastAPI, FakeBackend, Infer]:
    backend = backend or FakeBackend()
    config = RouterSettings(
        model_id="tiny-model", max_input_tokens=100, max_total_tokens=128, **settings
    )
    infer = Infer(backend, tokenizer, config.limits(), config.max_concurrent_requests)
    return create_app(infer, info or {}, config), backend, infer


@pytest.fixture
def app(tokenizer: RouterTokenizer) -> tuple[TestClient, FakeBackend]:
    app, backend, _ = build(tokenizer)
    return TestClient(app), backend


TOKENS = [
    {"id": 4, "text": " world", "logprob": -0.5, "special": False},
    {"id": 5, "text": " again", "logprob": -0.5, "special": False},
    {"id": 2, "text": "</s>", "logprob": -0.25, "special": True},
]


def test_generate_plain(app: tuple[TestClient, FakeBackend]) -> None:
    client, backend = app
    response = client.post("/generate", json={"inputs": "hello", "parameters": {}})
    assert response.status_code == 200
    assert response.json() == {"generated_text": " world again"}
    assert backend.requests[0].input_ids == (1, 3)
    assert backend.closed == 1
    headers = response.headers
    assert headers["x-compute-type"] == "gpu+optimized"
    assert headers["x-prompt-tokens"] == "2" and headers["x-generated-tokens"] == "3"
    assert headers["x-compute-characters"] == "5"
    for name in (
        "x-total-time",
        "x-validation-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
    ):
        assert headers[name].isdigit(), name
    assert float(headers["x-compute-time"]) >= 0


def test_generate_with_details(app: tuple[TestClient, FakeBackend]) -> None:
    client, _ = app
    response = client.post("/generate", json={"inputs": "hello", "parameters": {"details": True}})
    assert response.json() == {
        "generated_text": " world again",
        "details": {
            "finish_reason": "eos_token",
            "generated_tokens": 3,
            "seed": None,
            "prefill": [],
            "tokens": TOKENS,
        },
    }


def test_generate_seed_echoed_only_when_sampling(app: tuple[TestClient, FakeBackend]) -> None:
    client, _ = app
    body = {"inputs": "hello", "parameters": {"details": True, "do_sample": True, "seed": 7}}
    assert client.post("/generate", json=body).json()["details"]["seed"] == 7
    body["parameters"]["do_sample"] = False
    assert client.post("/generate", json=body).json()["details"]["seed"] is None


def test_generate_decoder_input_details(app: tuple[TestClient, FakeBackend]) -> None:
    client, backend = app
    body = {"inputs": "hello", "parameters": {"decoder_input_details": True}}
    details = client.post("/generate", json=body).json()["details"]
    assert details["prefill"] == [
        {"id": 1, "text": "<s>", "logprob": None},
        {"id": 3, "text": "hello", "logprob": -1.25},
    ]
    assert backend.requests[0].decoder_input_details


def test_generate_top_n_tokens(app: tuple[TestClient, FakeBackend]) -> None:
    client, _ = app
    body = {"inputs": "hello", "parameters": {"details": True, "top_n_tokens": 2}}
    details = client.post("/generate", json=body).json()["details"]
    top = [
        {"id": 10, "text": " x", "logprob": -1.0, "special": False},
        {"id": 11, "text": " y", "logprob": -2.0, "special": False},
    ]
    assert details["top_tokens"] == [top, top, top]


def test_generate_best_of_picks_highest_mean_logprob(tokenizer: RouterTokenizer) -> None:
    def by_call(request: ValidRequest, call: int) -> list[Any]:
        logprob, word = (-3.0, " bad") if call == 0 else (-0.1, " good")
        return [TokenEvent(tok(4, word, logprob), []), end(tok(5, word, logprob), word * 2, 2)]

    app, backend, infer = build(tokenizer, FakeBackend(by_call))
    body = {
        "inputs": "hello",
        "parameters": {"best_of": 2, "do_sample": True, "details": True, "return_full_text": True},
    }
    response = TestClient(app).post("/generate", json=body).json()
    assert response["generated_text"] == "hello good good"
    sequences = response["details"]["best_of_sequences"]
    assert [s["generated_text"] for s in sequences] == ["hello bad bad"]
    assert sequences[0]["tokens"][0]["logprob"] == -3.0
    assert "top_tokens" not in sequences[0]
    seeds = [r.parameters.seed for r in backend.requests]
    assert len(backend.requests) == 2 and seeds[0] != seeds[1]
    assert all(r.parameters.do_sample for r in backend.requests)
    assert {response["details"]["seed"], sequences[0]["seed"]} == set(seeds)
    assert backend.closed == 2 and infer.limiter.in_flight == 0


def test_generate_best_of_failure_cancels_siblings(tokenizer: RouterTokenizer) -> None:
    def one_fails(request: ValidRequest, call: int) -> list[Any]:
        if call == 0:
            return [GenerationError("Server error: boom")]
        return [TokenEvent(tok(4, "x"), [])]

    app, backend, infer = build(tokenizer, FakeBackend(one_fails, hang=True))
    body = {"inputs": "hello", "parameters": {"best_of": 2, "do_sample": True}}
    response = TestClient(app).post("/generate", json=body)
    assert response.status_code == 424
    assert backend.closed == 2 and infer.limiter.in_flight == 0


def test_return_full_text(app: tuple[TestClient, FakeBackend]) -> None:
    client, _ = app
    body = {"inputs": "hello", "parameters": {"return_full_text": True}}
    assert client.post("/generate", json=body).json() == {"generated_text": "hello world again"}


def test_compat_route_returns_an_array_with_full_text(app: tuple[TestClient, FakeBackend]) -> None:
    client, backend = app
    response = client.post("/", json={"inputs": "hello"})
    assert response.status_code == 200
    assert response.json() == [{"generated_text": "hello world again"}]
    assert backend.requests[0].parameters.do_sample  # TGI: no "parameters" means sampling
    explicit = client.post("/", json={"inputs": "hello", "parameters": {"return_full_text": False}})
    assert explicit.json() == [{"generated_text": " world again"}]


def test_compat_route_full_text_follows_pipeline_tag(tokenizer: RouterTokenizer) -> None:
    app, _, _ = build(tokenizer, info={"model_pipeline_tag": "text2text-generation"})
    assert TestClient(app).post("/", json={"inputs": "hello"}).json() == [
        {"generated_text": " world again"}
    ]


def sse_events(text: str) -> list[dict[str, Any]]:
    assert text.endswith("\n\n")
    chunks = text[:-2].split("\n\n")
    assert all(c.startswith("data: ") for c in chunks)
    return [json.loads(c[len("data: ") :]) for c in chunks]


def test_generate_stream_sequence_with_details(app: tuple[TestClient, FakeBackend]) -> None:
    client, backend = app
    response = client.post(
        "/generate_stream", json={"inputs": "hello", "parameters": {"details": True}}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-compute-type"] == "gpu+optimized"
    assert response.text == (
        'data: {"index":1,"token":{"id":4,"text":" world","logprob":-0.5,"special":false},'
        '"generated_text":null,"details":null}\n\n'
        'data: {"index":2,"token":{"id":5,"text":" again","logprob":-0.5,"special":false},'
        '"generated_text":null,"details":null}\n\n'
        'data: {"index":3,"token":{"id":2,"text":"</s>","logprob":-0.25,"special":true},'
        '"generated_text":" world again","details":{"finish_reason":"eos_token",'
        '"generated_tokens":3,"seed":null,"input_length":2}}\n\n'
    )
    assert backend.closed == 1


def test_generate_stream_without_details_and_with_top_tokens(
    app: tuple[TestClient, FakeBackend],
) -> None:
    client, _ = app
    body = {"inputs": "hello", "parameters": {"top_n_tokens": 1, "return_full_text": True}}
    events = sse_events(client.post("/generate_stream", json=body).text)
    assert [e["index"] for e in events] == [1, 2, 3]
    assert all(
        e["top_tokens"] == [{"id": 10, "text": " x", "logprob": -1.0, "special": False}]
        for e in events
    )
    assert [e["generated_text"] for e in events] == [None, None, "hello world again"]
    assert all(e["details"] is None for e in events)


def test_compat_route_streams(app: tuple[TestClient, FakeBackend]) -> None:
    client, _ = app
    response = client.post(
        "/", json={"inputs": "hello", "stream": True, "parameters": {"details": True}}
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1]["generated_text"] == "hello world again"
    assert events[-1]["details"]["input_length"] == 2


def test_stream_validation_error_is_in_band(app: tuple[TestClient, FakeBackend]) -> None:
    client, backend = app
    response = client.post(
        "/generate_stream", json={"inputs": "hello", "parameters": {"top_p": 0.0}}
    )
    assert response.status_code == 200
    assert response.text == (
        'data: {"error":"Input validation error: `top_p` must be > 0.0 and < 1.0",'
        '"error_type":"validation"}\n\n'
    )
    assert backend.requests == []


def test_stream_rejects_best_of_and_prefill_details(app: tuple[TestClient, FakeBackend]) -> None:
    client, _ = app
    for params, message in [
        (
            {"best_of": 2, "do_sample": True},
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        (
            {"decoder_input_details": True},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
    ]:
        text = client.post("/generate_stream", json={"inputs": "hi", "parameters": params}).text
        assert sse_events(text) == [
            {"error": f"Input validation error: {message}", "error_type": "validation"}
        ]


def test_stream_generation_error_after_tokens(tokenizer: RouterTokenizer) -> None:
    def fails(request: ValidRequest, call: int) -> list[Any]:
        return [TokenEvent(tok(4, " world"), []), GenerationError("Server error: CUDA OOM")]

    app, backend, infer = build(tokenizer, FakeBackend(fails))
    response = TestClient(app).post("/generate_stream", json={"inputs": "hello"})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[0]["index"] == 1
    assert events[1] == {
        "error": "Request failed during generation: Server error: CUDA OOM",
        "error_type": "generation",
    }
    assert backend.closed == 1 and infer.limiter.in_flight == 0


def test_stream_without_end_is_incomplete(tokenizer: RouterTokenizer) -> None:
    app, _, _ = build(tokenizer, FakeBackend(lambda r, c: [TokenEvent(tok(4, " w"), [])]))
    events = sse_events(TestClient(app).post("/generate_stream", json={"inputs": "hello"}).text)
    assert events[-1] == {
        "error": "Incomplete generation stream",
        "error_type": "incomplete_generation_stream",
    }


def test_generate_errors_map_to_status(tokenizer: RouterTokenizer) -> None:
    cases = [
        (
            [GenerationError("Server error: boom")],
            424,
            {
                "error": "Request failed during generation: Server error: boom",
                "error_type": "generation",
            },
        ),
        (
            [TokenEvent(tok(4, " w"), [])],
            500,
            {"error": "Incomplete generation", "error_type": "incomplete_generation"},
        ),
        (
            [RuntimeError("secret internals")],
            500,
            {"error": "Internal server error", "error_type": "internal"},
        ),
    ]
    for script, status, body in cases:
        app, _, infer = build(tokenizer, FakeBackend(lambda r, c, s=script: s))
        response = TestClient(app, raise_server_exceptions=False).post(
            "/generate", json={"inputs": "hello"}
        )
        assert (response.status_code, response.json()) == (status, body)
        assert "Traceback" not in response.text
        assert infer.limiter.in_flight == 0


def test_tokenize_byte_offsets(app: tuple[TestClient, FakeBackend]) -> None:
    client, _ = app
    response = client.post("/tokenize", json={"inputs": "hello é world"})
    assert response.status_code == 200
    assert response.json() == [
        {"id": 1, "text": "", "start": 0, "stop": 0},
        {"id": 3, "text": "hello", "start": 0, "stop": 5},
        {"id": 5, "text": "é", "start": 6, "stop": 8},
        {"id": 4, "text": "world", "start": 9, "stop": 14},
    ]
    truncated = client.post(
        "/tokenize", json={"inputs": "hello é world", "parameters": {"truncate": 1}}
    )
    assert [t["id"] for t in truncated.json()] == [4]


def test_info(tokenizer: RouterTokenizer) -> None:
    app, _, _ = build(
        tokenizer,
        info={"model_sha": "abc", "model_pipeline_tag": "text-generation"},
        max_concurrent_requests=7,
        max_client_batch_size=3,
        validation_workers=2,
    )
    info = TestClient(app).get("/info").json()
    assert info == {
        "model_id": "tiny-model",
        "model_sha": "abc",
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": 7,
        "max_best_of": 2,
        "max_stop_sequences": 4,
        "max_input_tokens": 100,
        "max_total_tokens": 128,
        "validation_workers": 2,
        "max_client_batch_size": 3,
        "router": "text-generation-router",
        "version": info["version"],
        "sha": None,
        "docker_label": None,
    }
    assert info["version"]


@pytest.mark.parametrize("path", ["/health", "/", "/ping"])
def test_health(app: tuple[TestClient, FakeBackend], path: str) -> None:
    client, backend = app
    ok = client.get(path)
    assert ok.status_code == 200 and ok.content == b""
    unhealthy = {"error": "unhealthy", "error_type": "healthcheck"}
    backend.healthy = False
    assert (client.get(path).status_code, client.get(path).json()) == (503, unhealthy)
    backend.healthy = RuntimeError("shard gone")
    assert (client.get(path).status_code, client.get(path).json()) == (503, unhealthy)


def test_api_key(tokenizer: RouterTokenizer) -> None:
    app, backend, _ = build(tokenizer, api_key="Secret-Key")
    client = TestClient(app)
    for path in ("/generate", "/generate_stream", "/", "/tokenize", "/chat_tokenize"):
        missing = client.post(path, json={"inputs": "hello"})
        assert missing.status_code == 401
        assert missing.json()["error_type"] == "authentication" and missing.json()["error"]
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = client.post(
            path, json={"inputs": "hello"}, headers={"Authorization": "Bearer other"}
        )
        assert wrong.status_code == 401
    assert backend.requests == []
    ok = client.post(
        "/generate", json={"inputs": "hello"}, headers={"authorization": "bearer secret-key"}
    )
    assert ok.status_code == 200
    for path in ("/info", "/health", "/metrics", "/"):
        assert client.get(path).status_code == 200, path


def test_cors_any_origin_by_default(app: tuple[TestClient, FakeBackend]) -> None:
    client, _ = app
    response = client.get("/info", headers={"Origin": "https://example.com"})
    assert response.headers["access-control-allow-origin"] == "*"
    preflight = client.options(
        "/generate",
        headers={
            "Origin": "https://example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    assert "POST" in preflight.headers["access-control-allow-methods"]


def test_cors_restricted_origins(tokenizer: RouterTokenizer) -> None:
    app, _, _ = build(tokenizer, cors_allow_origin=("https://good.example",))
    client = TestClient(app)
    good = client.get("/info", headers={"Origin": "https://good.example"})
    assert good.headers["access-control-allow-origin"] == "https://good.example"
    bad = client.get("/info", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in bad.headers


def test_docs_openapi_and_metrics(app: tuple[TestClient, FakeBackend]) -> None:
    client, _ = app
    spec = client.get("/api-doc/openapi.json").json()
    for path in ("/", "/generate", "/generate_stream", "/tokenize", "/info", "/health", "/metrics"):
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert {
        "GenerateRequest",
        "GenerateParameters",
        "GenerateResponse",
        "Details",
        "StreamResponse",
        "Token",
        "ErrorResponse",
    } <= set(schemas)
    assert client.get("/docs").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "python_info" in metrics.text


# ---- client disconnects, driven at the ASGI level ---------------------------------------------


async def call_asgi(
    app: FastAPI,
    path: str,
    body: dict[str, Any],
    disconnect: asyncio.Event,
    sent: list[dict[str, Any]],
) -> None:
    raw = json.dumps(body).encode()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "client": ("test", 1),
        "server": ("test", 80),
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
        ],
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)


def run_and_disconnect(
    tokenizer: RouterTokenizer,
    script: Script,
    path: str,
    after: Callable[[FakeBackend, list[dict[str, Any]]], bool],
    iterator_object: bool = False,
) -> tuple[FakeBackend, Infer, list[dict[str, Any]]]:
    backend = FakeBackend(script, hang=True, iterator_object=iterator_object)
    app, backend, infer = build(tokenizer, backend)
    sent: list[dict[str, Any]] = []

    async def scenario() -> None:
        disconnect = asyncio.Event()
        call = asyncio.create_task(call_asgi(app, path, {"inputs": "hello"}, disconnect, sent))
        while not after(backend, sent):
            await asyncio.sleep(0.001)
        disconnect.set()
        await call

    asyncio.run(scenario())
    return backend, infer, sent


def body_chunks(sent: list[dict[str, Any]]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]


def test_stream_disconnect_after_a_token_closes_the_backend(tokenizer: RouterTokenizer) -> None:
    backend, infer, sent = run_and_disconnect(
        tokenizer,
        lambda r, c: [TokenEvent(tok(4, " world"), [])],
        "/generate_stream",
        lambda b, s: len(body_chunks(s)) >= 1,
    )
    assert body_chunks(sent)[0].startswith(b'data: {"index":1')
    assert backend.closed == 1 and infer.limiter.in_flight == 0


@pytest.mark.parametrize("iterator_object", [False, True])
def test_stream_disconnect_while_queued_closes_the_backend(
    tokenizer: RouterTokenizer, iterator_object: bool
) -> None:
    backend, infer, sent = run_and_disconnect(
        tokenizer,
        lambda r, c: [],
        "/generate_stream",
        lambda b, s: bool(b.requests),
        iterator_object,
    )
    assert body_chunks(sent) == []
    assert backend.closed == 1 and infer.limiter.in_flight == 0


@pytest.mark.parametrize("iterator_object", [False, True])
def test_non_streaming_disconnect_closes_the_backend(
    tokenizer: RouterTokenizer, iterator_object: bool
) -> None:
    backend, infer, sent = run_and_disconnect(
        tokenizer,
        lambda r, c: [TokenEvent(tok(4, " world"), [])],
        "/generate",
        lambda b, s: bool(b.requests),
        iterator_object,
    )
    assert backend.closed == 1 and infer.limiter.in_flight == 0
    assert sent[0]["status"] == 499


def test_sse_keep_alive_while_the_source_is_silent() -> None:
    seen_keep_alive = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        await seen_keep_alive.wait()
        yield b"data: {}\n\n"

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message.get("body") == b": keep-alive\n\n":
            seen_keep_alive.set()

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    response = SSEResponse(source(), keep_alive_s=0.01)
    asyncio.run(asyncio.wait_for(response({"type": "http"}, receive, send), timeout=10))
    bodies = [m.get("body") for m in sent[1:]]
    assert bodies[0] == b": keep-alive\n\n"
    assert bodies[-2:] == [b"data: {}\n\n", b""]
    assert set(bodies[:-2]) == {b": keep-alive\n\n"}


def test_uvicorn_serves_http_with_httptools() -> None:
    """h11, uvicorn's fallback, costs the router ~0.5 ms more CPU per streamed token."""
    import uvicorn
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    config = uvicorn.Config(lambda scope, receive, send: None, lifespan="off")
    config.load()
    assert config.http_protocol_class is HttpToolsProtocol


# ---- the OpenAPI document says what the server does ------------------------------------------


def test_openapi_documents_media_types_and_statuses(tokenizer: RouterTokenizer) -> None:
    app, _, _ = build(tokenizer)
    paths = TestClient(app).get("/api-doc/openapi.json").json()["paths"]
    stream = paths["/generate_stream"]["post"]["responses"]
    assert list(stream["200"]["content"]) == ["text/event-stream"]
    assert set(paths["/"]["post"]["responses"]["200"]["content"]) == {
        "application/json", "text/event-stream"
    }
    assert "content" not in paths["/health"]["get"]["responses"]["200"]
    assert {"400", "413", "415", "422"} <= set(paths["/tokenize"]["post"]["responses"])
    assert "404" in paths["/v1/models/{name}"]["get"]["responses"]
    assert "401" not in stream and "security" not in paths["/generate"]["post"]


def test_openapi_states_the_validation_limits(tokenizer: RouterTokenizer) -> None:
    app, _, _ = build(tokenizer, max_stop_sequences=3, max_best_of=2)
    schemas = TestClient(app).get("/api-doc/openapi.json").json()["components"]["schemas"]
    params = schemas["GenerateParameters"]["properties"]
    assert params["truncate"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 100}
    assert params["stop"]["anyOf"][0]["maxItems"] == 3
    assert params["best_of"]["anyOf"][0]["maximum"] == 2
    assert params["seed"]["anyOf"][0]["maximum"] == 2**64 - 1
    assert schemas["GenerateRequest"]["properties"]["inputs"]["minLength"] == 1
    # /tokenize reads the text only: empty inputs and unchecked parameters are fine there.
    assert "minLength" not in schemas["TokenizeRequest"]["properties"]["inputs"]
    content = schemas["ChatMessage"]["properties"]["content"]
    assert {"type": "null"} not in content["anyOf"]
    logprobs = schemas["CompletionRequest"]["properties"]["logprobs"]["anyOf"][0]
    assert logprobs["maximum"] == 5  # --max-top-n-tokens, not OpenAI's 20


def test_openapi_documents_the_api_key(tokenizer: RouterTokenizer) -> None:
    app, _, _ = build(tokenizer, api_key="k")
    spec = TestClient(app).get("/api-doc/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    for path in ("/generate", "/tokenize", "/chat_tokenize", "/v1/chat/completions"):
        operation = spec["paths"][path]["post"]
        assert "401" in operation["responses"] and operation["security"], path
    assert "security" not in spec["paths"]["/info"]["get"]


def test_integral_floats_are_integers(app: tuple[TestClient, FakeBackend]) -> None:
    client, backend = app
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2.0, "seed": 1e3}}
    assert client.post("/generate", json=body).status_code == 200
    assert backend.requests[0].stopping.max_new_tokens == 2
    body["parameters"]["max_new_tokens"] = 2.5
    answer = client.post("/generate", json=body)
    assert answer.status_code == 422 and answer.json()["error_type"] == "validation"


def test_a_top_k_past_u32_is_a_422(app: tuple[TestClient, FakeBackend]) -> None:
    client, backend = app
    response = client.post("/generate", json={"inputs": "hello",
                                              "parameters": {"top_k": 2**40}})
    assert response.status_code == 422 and "top_k" in response.json()["error"]
    assert not backend.requests
