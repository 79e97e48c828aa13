"""The OpenAI routes against a scripted fake backend: shapes, parameters, stops, parity, errors."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tgserve.router.app import create_app
from tgserve.router.chat import ChatTemplate
from tgserve.router.infer import Infer
from tgserve.router.openai.decode import ChoiceDecoder
from tgserve.router.settings import RouterSettings
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
TEMPLATE = (
    "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)
WORDS = ["hello", "world", "user", "assistant", "system", "é", "again"]


def tok(i: int, text: str, logprob: float = -0.5, special: bool = False) -> Token:
    return Token(i, text, logprob, special)


def end(token: Token, n: int, reason: FinishReason = FinishReason.EOS_TOKEN) -> EndEvent:
    now = time.monotonic()
    return EndEvent(token, [], GeneratedText("", n, reason, None), now, now)


def pieces(*texts: str, reason: FinishReason = FinishReason.EOS_TOKEN) -> Script:
    """A script that generates `texts` (then EOS when reason is EOS_TOKEN), with top tokens."""

    def script(request: ValidRequest, call: int) -> list[Any]:
        top = [tok(90, " x", -1.0), tok(91, " y", -2.0)][: request.top_n_tokens]
        events: list[Any] = []
        if request.decoder_input_details:
            events.append(
                PrefillEvent(
                    [
                        Token(i, f"<{i}>", None if k == 0 else -0.25)
                        for k, i in enumerate(request.input_ids)
                    ],
                    # As the shard does: nothing for the first position, top-n for the others.
                    [[]] + [[Token(7, " y", -0.1)] * request.top_n_tokens]
                    * (len(request.input_ids) - 1),
                )
            )
        tokens = [tok(10 + k, t, -0.5 - call) for k, t in enumerate(texts)]
        if reason == FinishReason.EOS_TOKEN:
            tokens.append(tok(2, "</s>", -0.1, special=True))
        for t in tokens[:-1]:
            events.append(TokenEvent(t, top))
        final = end(tokens[-1], len(tokens), reason)
        events.append(
            EndEvent(final.token, top, final.generated_text, final.queued_at, final.started_at)
        )
        return events

    return script


class FakeBackend:
    def __init__(self, script: Script, hang: bool = False) -> None:
        self.script = script
        self.hang = hang  # after the script, wait forever (until closed)
        self.requests: list[ValidRequest] = []
        self.closed = 0
        self.consumed: list[int] = []  # events each request handed out

    def schedule(self, request: ValidRequest) -> AsyncIterator[InferEvent]:
        return self._events(request)

    async def _events(self, request: ValidRequest) -> AsyncIterator[InferEvent]:
        call = len(self.requests)
        self.requests.append(request)
        self.consumed.append(0)
        try:
            for item in self.script(request, call):
                await asyncio.sleep(0)
                if isinstance(item, Exception):
                    raise item
                self.consumed[call] += 1
                yield item
            if self.hang:
                await asyncio.Event().wait()
        finally:
            self.closed += 1

    async def health(self) -> bool:
        return True


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[RouterTokenizer]:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    router_tokenizer = RouterTokenizer(fast, validation_workers=2)
    yield router_tokenizer
    router_tokenizer.close()


def build(
    tokenizer: RouterTokenizer,
    backend: FakeBackend,
    template: str | None = TEMPLATE,
    **settings: Any,
) -> tuple[FastAPI, Infer]:
    config = RouterSettings(
        model_id="tiny-model", max_input_tokens=100, max_total_tokens=128, **settings
    )
    infer = Infer(backend, tokenizer, config.limits(), config.max_concurrent_requests)
    chat = ChatTemplate(template, "test", {"bos_token": "<s>"}) if template else None
    return create_app(infer, {}, config, chat), infer


def client_for(
    tokenizer: RouterTokenizer,
    script: Script | None = None,
    template: str | None = TEMPLATE,
    **settings: Any,
) -> tuple[TestClient, FakeBackend]:
    backend = FakeBackend(script or pieces(" hello", " world"))
    app, _ = build(tokenizer, backend, template, **settings)
    return TestClient(app), backend


def events(response: Any) -> list[Any]:
    """The SSE data payloads, JSON-decoded, with the final [DONE] kept as a string."""
    out = []
    for line in response.text.split("\n"):
        if line.startswith("data: "):
            data = line[len("data: ") :]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


USER = [{"role": "user", "content": "hello world"}]


# ---------------------------------------------------------------- decoder (pure)


def feed(decoder: ChoiceDecoder, texts: list[str], last: FinishReason) -> list[str]:
    out = []
    for k, text in enumerate(texts):
        is_last = k == len(texts) - 1
        delta = decoder.step(tok(k, text), [], last if is_last else None)
        out.append(delta.text)
        if decoder.done:
            break
    return out


@pytest.mark.parametrize(
    ("texts", "stops", "deltas", "reason"),
    [
        ([" a", " b"], (), [" a", " b"], "length"),
        # a stop split across tokens is held back, then cut
        ([" wo", "rld", " again"], ("world",), [" ", ""], "stop"),
        # held text that turns out not to be a stop is released
        ([" wo", "rm", " x"], ("world",), [" ", "worm", " x"], "length"),
        # a stop inside one token (the shard only matches at the end)
        ([" hello. Bye", " more"], ("."), [" hello"], "stop"),
        # earliest of several stops wins
        ([" a;b,c"], (",", ";"), [" a"], "stop"),
        # held back at the end of a length finish: the text is real, release it
        ([" x", " wor"], ("world",), [" x", " wor"], "length"),
        # multi-byte text
        ([" é", "🙂", "ü"], ("ü",), [" é", "🙂", ""], "stop"),
    ],
)
def test_decoder_stops_and_hold_back(
    texts: list[str], stops: tuple[str, ...], deltas: list[str], reason: str
) -> None:
    decoder = ChoiceDecoder(tuple(stops) if isinstance(stops, tuple) else (stops,))
    got = feed(decoder, texts, FinishReason.LENGTH)
    assert got == deltas
    assert decoder.finish_reason == reason
    assert "".join(got) == decoder.text


def test_decoder_special_tokens_add_no_text_and_eos_is_stop() -> None:
    decoder = ChoiceDecoder(want_logprobs=True)
    assert decoder.step(tok(1, " hi"), [], None).text == " hi"
    delta = decoder.step(tok(2, "</s>", special=True), [], FinishReason.EOS_TOKEN)
    assert delta.text == "" and delta.logprobs == () and delta.finish_reason == "stop"
    assert decoder.completion_tokens == 2


def test_decoder_echo_and_discard() -> None:
    decoder = ChoiceDecoder(("hello",), want_logprobs=True, discard_generated=True)
    delta = decoder.echo("say hello", [Token(1, "say", None), Token(2, " hello", -1.0)])
    assert delta.text == "say hello" and [e.prompt for e in delta.logprobs] == [True, True]
    # a stop inside the echoed prompt does not end the choice
    assert not decoder.done
    assert decoder.step(tok(3, " x"), [], FinishReason.LENGTH).finish_reason == "length"
    assert decoder.completion_tokens == 0 and decoder.text == "say hello"


# ---------------------------------------------------------------- chat


def test_chat_completion_shape_and_usage(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)
    r = client.post("/v1/chat/completions", json={"model": "anything", "messages": USER})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-model"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": " hello world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    request = backend.requests[0]
    # "user hello world assistant": the template's text, tokenized without special tokens
    assert request.inputs == "user hello world assistant"
    assert request.add_special_tokens is False and len(request.input_ids) == 4
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    assert r.headers["x-prompt-tokens"] == "4" and r.headers["x-generated-tokens"] == "3"


def test_chat_sampling_parameters_reach_the_request(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)
    body = {
        "messages": USER,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "n": 2,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "logit_bias": {"4": -100},
        "max_tokens": 5,
        "stop": "x",
        "user": "u1",
        "ignore_eos": True,
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    first, second = backend.requests
    p = first.parameters
    assert (p.do_sample, p.temperature, p.top_p, p.seed) == (True, 0.5, 0.9, 7)
    assert (p.presence_penalty, p.logit_bias) == (0.5, {4: -100.0})
    # OpenAI's frequency penalty (per occurrence), not TGI's length-normalised one.
    assert (p.additive_frequency_penalty, p.frequency_penalty) == (-0.5, 0.0)
    assert second.parameters.seed == 8  # n siblings get distinct seeds
    assert first.stopping.max_new_tokens == 5 and first.stopping.stop_sequences == ("x",)
    assert first.stopping.ignore_eos_token is True


def test_chat_temperature_defaults(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)
    client.post("/v1/chat/completions", json={"messages": USER})
    client.post("/v1/chat/completions", json={"messages": USER, "temperature": 0})
    default, greedy = backend.requests
    assert default.parameters.do_sample is True  # OpenAI samples at temperature 1 by default
    assert greedy.parameters.do_sample is False
    # null max_tokens: the rest of the context
    assert default.stopping.max_new_tokens == 128 - default.input_length


def test_chat_n_choices(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)
    r = client.post("/v1/chat/completions", json={"messages": USER, "n": 3})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len(backend.requests) == 3
    assert len({q.parameters.seed for q in backend.requests}) == 3
    assert body["usage"]["completion_tokens"] == 9 and body["usage"]["prompt_tokens"] == 4


def test_chat_logprobs(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)
    body = {"messages": USER, "logprobs": True, "top_logprobs": 2}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert backend.requests[0].top_n_tokens == 2
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [" hello", " world"]  # EOS carries no text
    assert content[0]["logprob"] == -0.5 and content[0]["bytes"] == list(b" hello")
    assert content[0]["top_logprobs"] == [
        {"token": " x", "logprob": -1.0, "bytes": list(b" x")},
        {"token": " y", "logprob": -2.0, "bytes": list(b" y")},
    ]
    r = client.post("/v1/chat/completions", json={"messages": USER, "top_logprobs": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


def test_chat_stream_parity_and_usage(tokenizer: RouterTokenizer) -> None:
    script = pieces(" hé", "llo", " wo", "rld", " again")
    client, _ = client_for(tokenizer, script)
    body = {"messages": USER, "stop": ["world"], "seed": 3}
    whole = client.post("/v1/chat/completions", json=body).json()
    stream_body = body | {"stream": True, "stream_options": {"include_usage": True}}
    r = client.post("/v1/chat/completions", json=stream_body)
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks = events(r)
    assert chunks[-1] == "[DONE]"
    usage_chunk = chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[:-2]]
    assert "".join(deltas) == whole["choices"][0]["message"]["content"] == " héllo "
    assert all("wo" not in d for d in deltas)  # the stop's start was held back, never sent
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] == 4  # up to the token that completed the stop
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])


def test_stop_inside_generation_cancels_the_request(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer, pieces(" a", " b.", " c", " d"))
    r = client.post("/v1/chat/completions", json={"messages": USER, "stop": "."})
    assert r.json()["choices"][0]["message"]["content"] == " a b"
    assert backend.consumed == [2] and backend.closed == 1


def test_chat_stream_n_choices_interleave(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer)
    r = client.post("/v1/chat/completions", json={"messages": USER, "n": 2, "stream": True})
    chunks = [c for c in events(r) if c != "[DONE]"]
    by_index: dict[int, str] = {}
    for c in chunks:
        choice = c["choices"][0]
        by_index[choice["index"]] = by_index.get(choice["index"], "") + choice["delta"]["content"]
    assert by_index == {0: " hello world", 1: " hello world"}
    assert "usage" not in chunks[-1] or chunks[-1]["usage"] is None


def test_stream_error_is_an_event_then_done(tokenizer: RouterTokenizer) -> None:
    def failing(request: ValidRequest, call: int) -> list[Any]:
        return [TokenEvent(tok(4, " hello"), []), GenerationError("shard died")]

    client, _ = client_for(tokenizer, failing)
    r = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    assert r.status_code == 200
    chunks = events(r)
    assert chunks[-1] == "[DONE]"
    error = chunks[-2]["error"]
    assert error["type"] == "server_error" and "shard died" in error["message"]
    r = client.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 500 and r.json()["error"]["code"] == "generation"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"reasoning_effort": "low"}, "reasoning_effort"),
        ({"store": True}, "store"),
        ({"foo": 1}, "foo"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"n": 0}, "n"),
        ({"stop": 5}, "stop"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 500}, "max_tokens"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"top_logprobs": 9, "logprobs": True}, "top_logprobs"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"n": 500}, "n"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"content": "x"}]}, "messages[0].role"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
                ]
            },
            "messages[0].content[0]",
        ),
        (
            {"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]},
            "messages[0].audio",
        ),
    ],
)
def test_bad_requests_are_400_naming_the_param(
    tokenizer: RouterTokenizer, extra: dict[str, Any], param: str
) -> None:
    client, backend = client_for(tokenizer)
    r = client.post("/v1/chat/completions", json={"messages": USER} | extra)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["message"]
    assert backend.requests == []


def test_no_op_values_of_unsupported_fields_are_accepted(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer)
    body = {
        "messages": USER,
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "store": False,
        "parallel_tool_calls": True,
        "n": 1,
        "logprobs": False,
        "logit_bias": {},
        "modalities": ["text"],
        "metadata": {"a": "b"},
        "service_tier": "auto",
        "stream_options": {"include_usage": True},
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_too_long_message_names_the_numbers(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer)
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 500})
    message = r.json()["error"]["message"]
    assert "`max_tokens`" in message and "128" in message and "500" in message
    assert "max_new_tokens" not in message and "--max-total-tokens" in message
    r = client.post("/v1/chat/completions", json={"messages": USER, "stop": list("abcde")})
    assert r.json()["error"]["message"].endswith("(the server's limit: --max-stop-sequences)")


def test_content_parts_and_roles(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)
    messages = [
        {"role": "developer", "content": "hello"},
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}],
            "name": "u",
        },
        {"role": "assistant", "content": "again", "refusal": None},
    ]
    assert client.post("/v1/chat/completions", json={"messages": messages}).status_code == 200
    # developer → system; parts joined; a final assistant message is continued, not closed
    assert backend.requests[0].inputs == "system hello user hello world assistant again"


def test_template_errors(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer, template=None)
    r = client.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "template_error" and "--tokenizer-config-path" in error["message"]
    raising = "{{ raise_exception('only user messages, please') }}"
    client, _ = client_for(tokenizer, template=raising)
    r = client.post("/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 400 and "only user messages" in r.json()["error"]["message"]


def test_overloaded_is_429(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer, max_concurrent_requests=2)
    r = client.post("/v1/chat/completions", json={"messages": USER, "n": 3})
    assert r.status_code == 400  # more than the server can ever run
    client, _ = client_for(tokenizer, max_concurrent_requests=2)
    # hold both permits by a stream that is not read yet, then ask for one more
    with client.stream(
        "POST", "/v1/chat/completions", json={"messages": USER, "n": 2, "stream": True}
    ) as held:
        assert held.status_code == 200
        r = client.post("/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        held.read()
    assert client.post("/v1/chat/completions", json={"messages": USER}).status_code == 200


# ---------------------------------------------------------------- completions


def test_completion_shape(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer, pieces(" world", reason=FinishReason.LENGTH))
    r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 1})
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [
        {"index": 0, "text": " world", "logprobs": None, "finish_reason": "length"}
    ]
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    assert backend.requests[0].add_special_tokens is True


def test_completion_prompt_forms(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)
    r = client.post("/v1/completions", json={"prompt": ["hello", "world again"], "n": 2})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 1 + 2
    assert [q.inputs for q in backend.requests] == ["hello", "hello", "world again", "world again"]
    client.post("/v1/completions", json={"prompt": [3, 4]})
    client.post("/v1/completions", json={"prompt": [[3], [4, 4]]})
    assert [q.input_ids for q in backend.requests[4:]] == [(3, 4), (3,), (4, 4)]
    assert backend.requests[4].inputs == "hello world"
    r = client.post("/v1/completions", json={"prompt": ["a"] * 5})
    assert r.status_code == 400 and "--max-client-batch-size" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": [99999]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_completion_echo_with_prompt_logprobs(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)
    body = {"prompt": "hello world", "echo": True, "logprobs": 1, "max_tokens": 3}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    assert backend.requests[0].decoder_input_details is True
    assert choice["text"] == "hello world hello world"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["<3>", "<4>", " hello", " world"]
    assert lp["token_logprobs"] == [None, -0.25, -0.5, -0.5]
    assert lp["top_logprobs"] == [None, {" y": -0.1}, {" x": -1.0}, {" x": -1.0}]
    assert lp["text_offset"] == [0, 3, 11, 17]


def test_completion_scoring_with_max_tokens_zero(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)
    body = {"prompt": "hello world", "echo": True, "logprobs": 0, "max_tokens": 0}
    r = client.post("/v1/completions", json=body).json()
    assert r["choices"][0]["text"] == "hello world"
    assert r["choices"][0]["logprobs"]["token_logprobs"] == [None, -0.25]
    assert r["usage"]["completion_tokens"] == 0
    assert backend.requests[0].stopping.max_new_tokens == 1


def test_completion_best_of_returns_the_most_likely(tokenizer: RouterTokenizer) -> None:
    client, backend = client_for(tokenizer)  # call k has logprob -0.5 - k per token
    r = client.post("/v1/completions", json={"prompt": "hello", "best_of": 2, "n": 1})
    body = r.json()
    assert len(backend.requests) == 2 and len(body["choices"]) == 1
    assert body["usage"]["completion_tokens"] == 6  # every sequence generated counts
    r = client.post("/v1/completions", json={"prompt": "hello", "best_of": 2, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_completion_stream_parity(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer, pieces(" hé", "llo", " wo", "rld"))
    body = {"prompt": "hello", "stop": ["llo w"], "echo": True, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = events(client.post("/v1/completions", json=body | {"stream": True}))
    assert chunks[-1] == "[DONE]"
    parts = [c["choices"][0] for c in chunks[:-1]]
    assert "".join(p["text"] for p in parts) == whole["text"] == "hello hé"
    tokens = [t for p in parts if p["logprobs"] for t in p["logprobs"]["tokens"]]
    offsets = [t for p in parts if p["logprobs"] for t in p["logprobs"]["text_offset"]]
    assert tokens == whole["logprobs"]["tokens"] and offsets == whole["logprobs"]["text_offset"]
    assert parts[-1]["finish_reason"] == whole["finish_reason"] == "stop"


def test_completion_suffix(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer)
    r = client.post("/v1/completions", json={"prompt": "hello", "suffix": "world"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_completion_suffix_with_fim_tokens() -> None:
    vocab = {"<unk>": 0, "<fim_prefix>": 1, "<fim_suffix>": 2, "<fim_middle>": 3, "a": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fim = RouterTokenizer(PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>"))
    try:
        client, backend = client_for(fim)
        r = client.post("/v1/completions", json={"prompt": "a ", "suffix": " a"})
        assert r.status_code == 200, r.text
        assert backend.requests[0].inputs == "<fim_prefix>a <fim_suffix> a<fim_middle>"
    finally:
        fim.close()


# ---------------------------------------------------------------- other routes


def test_models_and_chat_tokenize(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer)
    listing = client.get("/v1/models").json()
    assert listing["object"] == "list"
    assert [(m["id"], m["object"]) for m in listing["data"]] == [("tiny-model", "model")]
    assert client.get("/v1/models/tiny-model").json()["id"] == "tiny-model"
    missing = client.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    r = client.post("/chat_tokenize", json={"messages": USER}).json()
    assert r["templated_text"] == "user hello world assistant"
    assert [t["text"] for t in r["tokenize_response"]] == ["user", "hello", "world", "assistant"]


def test_openapi_lists_the_routes(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer)
    paths = client.get("/api-doc/openapi.json").json()["paths"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/chat_tokenize"):
        assert path in paths


# ---------------------------------------------------------------- client disconnects (ASGI level)


async def call_asgi(app: FastAPI, body: dict[str, Any], leave: asyncio.Event, sent: list) -> None:
    raw = json.dumps(body).encode()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "client": ("test", 1),
        "server": ("test", 80),
        "headers": [(b"content-type", b"application/json")],
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=10)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_cancels_every_choice(tokenizer: RouterTokenizer, stream: bool) -> None:
    backend = FakeBackend(lambda r, c: [TokenEvent(tok(4, " hello"), [])], hang=True)
    app, infer = build(tokenizer, backend)
    sent: list[dict[str, Any]] = []

    async def scenario() -> None:
        leave = asyncio.Event()
        body = {"messages": USER, "n": 2, "stream": stream}
        call = asyncio.create_task(call_asgi(app, body, leave, sent))
        while sum(backend.consumed) < 2:  # both choices produced their token, then hang
            await asyncio.sleep(0.001)
        assert infer.limiter.in_flight == 2
        leave.set()
        await call

    asyncio.run(scenario())
    assert backend.closed == 2 and infer.limiter.in_flight == 0
    assert sent[0]["status"] == (200 if stream else 499)


def test_unreadable_body_is_a_400_in_openai_shape(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer, pieces(" a"))
    for path in ("/v1/chat/completions", "/v1/completions", "/chat_tokenize"):
        answer = client.post(path, content=b'{"prompt": "\xff"}',
                             headers={"content-type": "application/json"})
        assert answer.status_code == 400, path
        assert answer.json()["error"]["type"] == "invalid_request_error", path


def test_logit_bias_key_with_a_non_ascii_digit_is_a_400(tokenizer: RouterTokenizer) -> None:
    client, _ = client_for(tokenizer, pieces(" a"))
    body = {"prompt": "hello", "logit_bias": {"\u00b2": 1.0}}
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "logit_bias"


def test_a_top_k_past_u32_is_a_400_not_a_500(tokenizer: RouterTokenizer) -> None:
    # Found by the fuzz run: the shards' u32 could not carry it, and the router answered 500.
    client, backend = client_for(tokenizer)
    response = client.post("/v1/completions",
                           json={"prompt": "hello", "top_k": 381085423189538624, "max_tokens": 2})
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_k"
    assert not backend.requests


def test_the_tokenize_bodies_state_the_exact_seed_bound(tokenizer: RouterTokenizer) -> None:
    # Found by the fuzz run: a float bound of 2**64 let a schema-valid seed of 2**64 + 384 through.
    client, _ = client_for(tokenizer)
    schemas = client.get("/api-doc/openapi.json").json()["components"]["schemas"]
    for name in ("ChatTokenizeRequest", "TokenizeParameters"):
        seed = schemas[name]["properties"]["seed"]
        bound = next(b for b in seed.get("anyOf", [seed]) if b.get("type") == "integer")
        assert bound["maximum"] == 2**64 - 1 and isinstance(bound["maximum"], int)
