"""`huggingface_hub.InferenceClient` and the `text-generation` package against a live server."""

from __future__ import annotations

import pytest

from tests.integration.server import LaunchedServer
from tests.needs import require

PROMPT = "The capital of France is"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def hub(server: LaunchedServer):  # type: ignore[no-untyped-def]
    huggingface_hub = require("huggingface_hub")
    return huggingface_hub.InferenceClient(base_url=server.url, timeout=300)


def test_text_generation_with_details(hub) -> None:  # type: ignore[no-untyped-def]
    out = hub.text_generation(PROMPT, max_new_tokens=6, details=True, decoder_input_details=True)
    assert "Paris" in out.generated_text
    details = out.details
    assert details.finish_reason == "length" and details.generated_tokens == 6
    assert len(details.tokens) == 6 and len(details.prefill) == 5


def test_text_generation_stream(hub) -> None:  # type: ignore[no-untyped-def]
    events = list(hub.text_generation(PROMPT, max_new_tokens=6, stream=True, details=True))
    assert len(events) == 6
    assert events[-1].details.generated_tokens == 6
    assert "".join(e.token.text for e in events) in events[-1].generated_text


def test_chat_completion(hub) -> None:  # type: ignore[no-untyped-def]
    out = hub.chat_completion(messages=QUESTION, max_tokens=12, temperature=0)
    content = out.choices[0].message.content
    assert "Paris" in content and out.usage.completion_tokens > 0
    chunks = list(hub.chat_completion(messages=QUESTION, max_tokens=12, temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == content


@pytest.fixture(scope="module")
def tgi_client(server: LaunchedServer):  # type: ignore[no-untyped-def]
    text_generation = require("text_generation")
    return text_generation.Client(server.url, timeout=300)


def test_text_generation_package(tgi_client) -> None:  # type: ignore[no-untyped-def]
    response = tgi_client.generate(PROMPT, max_new_tokens=6)
    assert "Paris" in response.generated_text
    assert response.details.generated_tokens == 6
    streamed = list(tgi_client.generate_stream(PROMPT, max_new_tokens=6))
    assert "".join(r.token.text for r in streamed) == response.generated_text
    assert streamed[-1].details.generated_tokens == 6
