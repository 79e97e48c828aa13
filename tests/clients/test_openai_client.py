"""The official `openai` package against a live server on the default model."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.integration.server import LaunchedServer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server: LaunchedServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=300)


def test_models_list(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    assert len(models) == 1 and models[0].object == "model"
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="anything", messages=QUESTION, max_tokens=12, temperature=0
    )
    assert r.object == "chat.completion" and r.model == client.models.list().data[0].id
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    usage = r.usage
    assert usage is not None and usage.prompt_tokens > 10
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    body = {"model": "m", "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    whole = client.chat.completions.create(**body)  # type: ignore[call-overload]
    stream = client.chat.completions.create(
        **body, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}


def test_chat_logprobs_and_n(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="m", messages=QUESTION, max_tokens=6, n=2, seed=11, logprobs=True, top_logprobs=3
    )
    assert [c.index for c in r.choices] == [0, 1]
    for choice in r.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
        assert all(bytes(t.bytes or []) == t.token.encode() for t in content)
    # Every returned logprob is a generated token (an EOS is counted but carries no text).
    assert r.usage is not None
    assert r.usage.completion_tokens >= sum(
        len(c.logprobs.content) for c in r.choices if c.logprobs
    )


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="m", prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert r.object == "text_completion" and "Paris" in r.choices[0].text
    assert r.usage is not None and r.usage.prompt_tokens == 5
    stream = client.completions.create(
        model="m",
        prompt="The capital of France is",
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage == r.usage


def test_completions_echo_scores_the_prompt(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="m", prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=1
    )
    choice = r.choices[0]
    assert choice.text == "The capital of France is Paris"
    assert choice.logprobs is not None
    values = choice.logprobs.token_logprobs or []
    assert values[0] is None and all(v is not None and v <= 0 for v in values[1:])
    assert len(values) == 6 and r.usage is not None and r.usage.completion_tokens == 0


def test_completions_echo_gives_prompt_alternatives(client: openai.OpenAI) -> None:
    """An evaluation harness's "is greedy" check: each prompt position's top alternatives."""
    r = client.completions.create(
        model="m", prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=2
    )
    logprobs = r.choices[0].logprobs
    assert logprobs is not None and logprobs.top_logprobs is not None
    tops, values, tokens = logprobs.top_logprobs, logprobs.token_logprobs, logprobs.tokens
    assert tops[0] is None and len(tops) == 6
    for top, value, token in zip(tops[1:], values[1:], tokens[1:]):
        assert top is not None and len(top) >= 2
        assert max(top.values()) >= value - 1e-4  # the best alternative is at least as likely
        if token in top:
            assert abs(top[token] - value) < 1e-4
    # " Paris" after "The capital of France is" is the model's first choice.
    assert tokens[-1] == " Paris" and max(tops[-1], key=tops[-1].get) == " Paris"


def test_logit_bias_bans_a_token(client: openai.OpenAI, server: LaunchedServer) -> None:
    tokens = httpx.post(f"{server.url}/tokenize", json={"inputs": "France is Paris"}).json()
    paris = tokens[-1]["id"]
    body = {"model": "m", "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}
    assert client.completions.create(**body).choices[0].text.startswith(" Paris")
    banned = client.completions.create(**body, logit_bias={str(paris): -100})
    assert not banned.choices[0].text.startswith(" Paris")


@pytest.mark.parametrize(
    "bad",
    [
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"response_format": {"type": "json_object"}},
        {"temperature": 3},
        {"extra_body": {"no_such_field": 1}},
    ],
)
def test_bad_parameters_raise_bad_request(client: openai.OpenAI, bad: dict) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2, **bad)
    error = info.value.body
    assert isinstance(error, dict) and error["param"] and error["message"]
