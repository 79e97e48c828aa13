"""Streaming equals non-streaming on a live server: same seed, same text, stops and UTF-8 too."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.integration.server import LaunchedServer

CHAT = [
    ("Write one sentence about the sea.", ["."]),
    ("Écris une phrase en français sur le café, avec des accents.", ["é"]),
    ("用中文写一句关于月亮的话。", ["。"]),
    ("Reply with three emojis and a short word.", ["in", "\n"]),
]
COMPLETIONS = [
    ("Once upon a time, in a land far away,", [" the", "."]),
    ("Les élèves de l'école", ["è", ","]),
    ("東京は", ["。"]),
    ("🙂🙂 Emoji story:", ["\n\n", "ing"]),
]
SETTINGS = [{"temperature": 0}, {"temperature": 0.8, "seed": 1}, {"temperature": 0.8, "seed": 2}]


def streamed(url: str, body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The stream's JSON chunks, and whether it ended with [DONE]."""
    chunks: list[dict[str, Any]] = []
    done = False
    with httpx.stream(
        "POST",
        url,
        json=body | {"stream": True, "stream_options": {"include_usage": True}},
        timeout=300,
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks.append(json.loads(line[len("data: ") :]))
    return chunks, done


def check(url: str, body: dict[str, Any], text_of: Any, stops: list[str]) -> str:
    whole = httpx.post(url, json=body, timeout=300)
    assert whole.status_code == 200, whole.text
    expected = whole.json()
    chunks, done = streamed(url, body)
    assert done and not any("error" in c for c in chunks)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    text = "".join(text_of(c) for c in choices)
    reference = expected["choices"][0]
    assert text == text_of(reference, whole=True), body
    assert choices[-1]["finish_reason"] == reference["finish_reason"]
    assert chunks[-1]["usage"] == expected["usage"]
    assert not any(stop in text for stop in stops)
    return str(reference["finish_reason"])


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "seed1", "seed2"])
def test_chat_parity(server: LaunchedServer, settings: dict[str, Any]) -> None:
    def text_of(choice: dict[str, Any], whole: bool = False) -> str:
        return choice["message"]["content"] if whole else choice["delta"]["content"]

    for prompt, stops in CHAT:
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": 24,
            "stop": stops,
            **settings,
        }
        check(f"{server.url}/v1/chat/completions", body, text_of, stops)


@pytest.mark.parametrize("settings", SETTINGS, ids=["greedy", "seed1", "seed2"])
def test_completions_parity(server: LaunchedServer, settings: dict[str, Any]) -> None:
    def text_of(choice: dict[str, Any], whole: bool = False) -> str:
        return str(choice["text"])

    reasons = []
    for prompt, stops in COMPLETIONS:
        body = {"prompt": prompt, "max_tokens": 24, "stop": stops, **settings}
        reasons.append(check(f"{server.url}/v1/completions", body, text_of, stops))
    assert "stop" in reasons  # the corpus does exercise stop strings
