"""Hand-written bad requests against a live server: each gets its status, in the error shape."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import tiny_server
from tests.integration.server import LaunchedServer

JSON = {"content-type": "application/json"}
PAYLOAD_LIMIT = 4096

# (name, method, path, raw body, headers, expected status)
CASES: list[tuple[str, str, str, bytes | None, dict[str, str], int]] = [
    ("malformed JSON", "POST", "/generate", b'{"inputs": "a",', JSON, 400),
    ("not UTF-8", "POST", "/generate", b'{"inputs": "\xff\xfe"}', JSON, 400),
    ("not UTF-8, OpenAI route", "POST", "/v1/completions", b'{"prompt": "\xff"}', JSON, 400),
    ("raw NUL byte", "POST", "/generate", b'{"inputs": "a\x00"}', JSON, 400),
    ("escaped NUL in text", "POST", "/tokenize", b'{"inputs": "a\\u0000b"}', JSON, 200),
    ("huge max_new_tokens", "POST", "/generate",
     b'{"inputs": "a", "parameters": {"max_new_tokens": 1e30}}', JSON, 422),
    ("negative max_new_tokens", "POST", "/generate",
     b'{"inputs": "a", "parameters": {"max_new_tokens": -1}}', JSON, 422),
    ("huge seed", "POST", "/generate",
     b'{"inputs": "a", "parameters": {"seed": 36893488147419103232}}', JSON, 422),
    ("NaN literal", "POST", "/generate",
     b'{"inputs": "a", "parameters": {"temperature": NaN}}', JSON, 422),
    ("Infinity literal", "POST", "/v1/completions",
     b'{"prompt": "a", "temperature": Infinity}', JSON, 400),
    ("100 stop strings", "POST", "/generate",
     b'{"inputs": "a", "parameters": {"stop": [' + b",".join([b'"s"'] * 100) + b"]}}",
     JSON, 422),
    ("empty inputs", "POST", "/generate", b'{"inputs": ""}', JSON, 422),
    ("empty messages", "POST", "/v1/chat/completions", b'{"messages": []}', JSON, 400),
    ("null content", "POST", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": null}]}', JSON, 400),
    ("oversized prompt batch", "POST", "/v1/completions",
     b'{"prompt": [' + b",".join([b'"a"'] * 100) + b"], \"max_tokens\": 1}", JSON, 400),
    ("body over --payload-limit", "POST", "/generate",
     b'{"inputs": "' + b"a" * PAYLOAD_LIMIT + b'"}', JSON, 413),
    ("text/plain body", "POST", "/generate", b'{"inputs": "a"}', {"content-type": "text/plain"},
     415),
    ("JSON array body", "POST", "/generate", b"[1, 2]", JSON, 422),
    ("bad X-Request-Timeout", "POST", "/generate", b'{"inputs": "a"}',
     {**JSON, "x-request-timeout": "soon"}, 422),
    ("cache_salt too long", "POST", "/v1/completions",
     b'{"prompt": "a", "max_tokens": 1, "cache_salt": "' + b"s" * 2000 + b'"}', JSON, 400),
    ("unknown route", "GET", "/nope", None, {}, 404),
    ("wrong method", "GET", "/generate", None, {}, 405),
    ("wrong method on info", "POST", "/info", b"{}", JSON, 405),
]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path) -> Iterator[LaunchedServer]:
    launched = tiny_server(tiny_model_dir, "--payload-limit", str(PAYLOAD_LIMIT)).start()
    yield launched
    launched.stop()


@pytest.mark.parametrize(("method", "path", "body", "headers", "status"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(
    server: LaunchedServer, method: str, path: str, body: bytes | None,
    headers: dict[str, str], status: int,
) -> None:
    response = httpx.request(method, server.url + path, content=body, headers=headers,
                             timeout=60)
    assert response.status_code == status, response.text
    if status >= 400:
        assert "error" in response.json(), response.text
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
