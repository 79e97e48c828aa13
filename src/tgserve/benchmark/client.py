"""Async streaming clients of OpenAI /v1/completions and TGI /generate_stream, timing each chunk."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tgserve.benchmark.prompts import Prompt
from tgserve.benchmark.stats import RequestRecord

APIS = ("openai", "tgi")
OPENAI_PATH = "/v1/completions"
TGI_PATH = "/generate_stream"


@dataclass(frozen=True)
class Endpoint:
    """One server under test."""

    name: str
    url: str
    api: str = "openai"
    model: str | None = None

    def __post_init__(self) -> None:
        if self.api not in APIS:
            raise ValueError(f"api must be one of {APIS}, got {self.api!r}")


@dataclass(frozen=True)
class GenerationSettings:
    """What every request asks for."""

    max_new_tokens: int = 128
    ignore_eos: bool = True
    include_usage: bool = True


@dataclass(frozen=True)
class SseEvent:
    """One server-sent event: its optional `event:` name and its joined `data:` lines."""

    event: str | None
    data: str


@dataclass(frozen=True)
class ChunkInfo:
    """What one streamed event means for the request's accounting."""

    tokens: int = 0
    reported_tokens: int | None = None
    error: str | None = None
    done: bool = False


def openai_payload(prompt: str, model: str, settings: GenerationSettings) -> dict[str, Any]:
    """A streamed greedy completion request; `ignore_eos` is the extension vLLM/llama.cpp accept."""
    payload: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": settings.max_new_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": settings.ignore_eos,
    }
    if settings.include_usage:
        payload["stream_options"] = {"include_usage": True}
    return payload


def tgi_payload(prompt: str, settings: GenerationSettings) -> dict[str, Any]:
    """A greedy /generate_stream request; `details` makes the last event carry the token count."""
    return {
        "inputs": prompt,
        "parameters": {
            "max_new_tokens": settings.max_new_tokens,
            "ignore_eos": settings.ignore_eos,
            "do_sample": False,
            "details": True,
        },
    }


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    """Groups SSE lines into events; comment lines (keep-alives) are skipped."""
    data: list[str] = []
    name: str | None = None
    async for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield SseEvent(name, "\n".join(data))
            data, name = [], None
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "data":
            data.append(value)
        elif key == "event":
            name = value
    if data:
        yield SseEvent(name, "\n".join(data))


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _decode(event: SseEvent) -> tuple[Any, ChunkInfo | None]:
    """The event's JSON, or the ChunkInfo that ends the request when it is not usable JSON."""
    try:
        obj = json.loads(event.data)
    except json.JSONDecodeError:
        if event.event == "error":
            return None, ChunkInfo(error=event.data)
        return None, ChunkInfo(error=f"invalid JSON in stream: {event.data[:200]!r}")
    inner = obj.get("error") if isinstance(obj, dict) else None
    if event.event == "error" or inner:
        return None, ChunkInfo(error=_error_text(inner or obj))
    if not isinstance(obj, dict):
        return None, ChunkInfo(error=f"unexpected stream event: {event.data[:200]!r}")
    return obj, None


def parse_openai_event(event: SseEvent) -> ChunkInfo:
    """A completion chunk counts as a token when any choice has text or is not a finish marker."""
    if event.data.strip() == "[DONE]":
        return ChunkInfo(done=True)
    obj, failure = _decode(event)
    if failure is not None:
        return failure
    usage = obj.get("usage")
    reported = usage.get("completion_tokens") if isinstance(usage, dict) else None
    has_token = any(_choice_has_token(c) for c in obj.get("choices") or [])
    return ChunkInfo(tokens=int(has_token), reported_tokens=_int_or_none(reported))


def _choice_has_token(choice: Any) -> bool:
    if not isinstance(choice, dict):
        return False
    text = choice.get("text")
    # An empty text with a finish reason is the end marker some servers send; an empty text
    # without one is a token that decoded to nothing (a special token).
    return isinstance(text, str) and (bool(text) or not choice.get("finish_reason"))


def parse_tgi_event(event: SseEvent) -> ChunkInfo:
    """Every /generate_stream event carries one token; the one with generated_text is the last."""
    obj, failure = _decode(event)
    if failure is not None:
        return failure
    details = obj.get("details")
    reported = details.get("generated_tokens") if isinstance(details, dict) else None
    return ChunkInfo(
        tokens=int(isinstance(obj.get("token"), dict)),
        reported_tokens=_int_or_none(reported),
        done=obj.get("generated_text") is not None,
    )


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _request_for(
    endpoint: Endpoint, prompt: str, settings: GenerationSettings
) -> tuple[str, dict[str, Any], Callable[[SseEvent], ChunkInfo]]:
    if endpoint.api == "openai":
        payload = openai_payload(prompt, endpoint.model or "default", settings)
        return OPENAI_PATH, payload, parse_openai_event
    return TGI_PATH, tgi_payload(prompt, settings), parse_tgi_event


async def send_request(
    client: httpx.AsyncClient, endpoint: Endpoint, prompt: Prompt, settings: GenerationSettings
) -> RequestRecord:
    """Streams one request and records its timeline; failures land in `record.error`."""
    record = RequestRecord(prompt_index=prompt.index, start=time.perf_counter())
    try:
        await _stream_into(client, endpoint, prompt.text, settings, record)
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}".rstrip(": ")
    record.end = time.perf_counter()
    return record


async def _stream_into(
    client: httpx.AsyncClient,
    endpoint: Endpoint,
    prompt: str,
    settings: GenerationSettings,
    record: RequestRecord,
) -> None:
    path, payload, parse = _request_for(endpoint, prompt, settings)
    counted, reported = 0, None
    async with client.stream("POST", path, json=payload) as response:
        if response.status_code != 200:
            body = (await response.aread()).decode("utf-8", errors="replace")
            record.error = f"HTTP {response.status_code}: {body[:300]}"
            return
        async for event in iter_sse(response.aiter_lines()):
            info = parse(event)
            if info.error is not None:
                record.error = info.error
                break
            if info.tokens:
                record.chunk_times.append(time.perf_counter())
                counted += info.tokens
            if info.reported_tokens is not None:
                reported = info.reported_tokens
            if info.done:
                break
    record.output_tokens = reported if reported is not None else counted
    if record.error is None and record.output_tokens == 0:
        record.error = "stream ended without any token"


def make_client(
    base_url: str,
    timeout_s: float,
    max_connections: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """A pooled client with room for every concurrent stream."""
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    # trust_env=False: a proxy from the environment would sit inside every measured latency.
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s),
        limits=limits,
        transport=transport,
        trust_env=False,
    )


async def discover_model(client: httpx.AsyncClient) -> str | None:
    """The first model id of GET /v1/models, which servers such as vLLM require in requests."""
    try:
        response = await client.get("/v1/models")
        data = response.json().get("data") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        model = data[0].get("id")
        return model if isinstance(model, str) else None
    return None
