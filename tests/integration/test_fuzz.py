"""A bounded schemathesis run over the server's own OpenAPI document, with every check it has.

Every operation gets positive cases (schema-valid: they must be accepted) and negative ones
(schema-invalid: they must be refused), on the default model. Positive cases are narrowed before
they are sent to what JSON Schema cannot state (token counts, rules between fields) and to two
new tokens, so that each one is quick; negative ones go out as generated.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection

from tests.integration.server import LaunchedServer

pytestmark = pytest.mark.longrun

EXAMPLES = int(os.environ.get("TGSERVE_FUZZ_EXAMPLES", "25"))  # per operation and mode
NEW_TOKENS = 2
TEXT_CHARS = 48
MAX_CHOICES = 4  # --max-concurrent-requests
SUMMARY = Path(os.environ.get("TGSERVE_FUZZ_SUMMARY", tempfile.gettempdir())) / "fuzz-summary.json"


@pytest.fixture(scope="module")
def server() -> Iterator[LaunchedServer]:
    launched = LaunchedServer([
        "--max-input-tokens", "512", "--max-total-tokens", "528",
        "--max-batch-prefill-tokens", "1024", "--max-concurrent-requests", str(MAX_CHOICES),
        "--max-client-batch-size", "2",
    ]).start()
    yield launched
    launched.stop()


def _short(text: Any) -> Any:
    return text[:TEXT_CHARS] if isinstance(text, str) else text


def _cap(value: Any, default: int = NEW_TOKENS) -> int:
    return default if value is None else min(value, NEW_TOKENS)


def _native(body: dict[str, Any], stream: bool) -> None:
    body["inputs"] = _short(body["inputs"])
    params = body.setdefault("parameters", {})
    params["max_new_tokens"] = _cap(params.get("max_new_tokens"))
    if stream:
        params.update(best_of=None, decoder_input_details=False)
    elif (params.get("best_of") or 1) > 1:
        params.update(do_sample=True, seed=None)


def _messages(body: dict[str, Any]) -> None:
    body["messages"] = body["messages"][:3]
    for message in body["messages"]:
        content = message["content"]
        if isinstance(content, str):
            message["content"] = _short(content)
        else:
            message["content"] = [part | {"text": _short(part["text"])} for part in content[:2]]


def _sampling(body: dict[str, Any]) -> None:
    body["logit_bias"] = {k: v for k, v in (body.get("logit_bias") or {}).items() if int(k) < 1000}
    body["n"] = min(body.get("n") or 1, 2)


def _chat(body: dict[str, Any]) -> None:
    _messages(body)
    _sampling(body)
    for name in ("max_tokens", "max_completion_tokens"):
        body[name] = _cap(body.get(name))
    if body.get("top_logprobs"):
        body["logprobs"] = True


def _completion(body: dict[str, Any]) -> None:
    _sampling(body)
    prompt = body["prompt"]
    if isinstance(prompt, str):
        body["prompt"] = _short(prompt)
    elif prompt and isinstance(prompt[0], (int, float)):  # token ids (5.0 is an integer too)
        body["prompt"] = prompt[:16]
    else:
        body["prompt"] = [_short(p) if isinstance(p, str) else p[:16] for p in prompt[:2]]
    body["max_tokens"] = _cap(body.get("max_tokens"))
    best_of = body.get("best_of")
    if best_of is not None:
        body["best_of"] = body["n"] if body.get("stream") else min(max(best_of, body["n"]), 2)
    if body.get("suffix") is not None:
        body["echo"] = False
        if not isinstance(body["prompt"], str):
            body["suffix"] = None


NARROW = {
    "/": lambda b: _native(b, bool(b.get("stream"))),
    "/generate": lambda b: _native(b, False),
    "/generate_stream": lambda b: _native(b, True),
    "/tokenize": lambda b: b.update(inputs=_short(b["inputs"])),
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/chat_tokenize": _messages,
}


def _first_event(response: Any) -> Any:
    for line in response.text.splitlines():
        if line.startswith("data:"):
            return json.loads(line[5:])
    return None


def _refused(response: Any) -> bool:
    """A 4xx, or (streams validate after the 200, as TGI) a stream that is one error event."""
    if 400 <= response.status_code < 500:
        return True
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        event = _first_event(response)
        return isinstance(event, dict) and "error" in event
    return False


def _error_shaped(response: Any) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and "error" in body


def test_fuzz_the_openapi_document(server: LaunchedServer) -> None:
    schema = schemathesis.openapi.from_url(f"{server.url}/api-doc/openapi.json")
    statuses: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    cases = 0
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: Any) -> None:
                nonlocal cases
                narrow = NARROW.get(case.path)
                positive = case.meta.generation.mode is GenerationMode.POSITIVE
                if positive and narrow and isinstance(case.body, dict):
                    narrow(case.body)
                response = case.call(base_url=server.url, timeout=60)
                cases += 1
                kind = "positive" if positive else "negative"
                statuses[f"{case.operation.label} {kind} {response.status_code}"] += 1
                problems = []
                try:
                    # Replaced below by a check that also reads a stream's in-band refusal.
                    case.validate_response(response, excluded_checks=[negative_data_rejection])
                except FailureGroup as group:
                    problems += [f"{type(f).__name__}: {f.title}" for f in group.exceptions]
                if not positive and not _refused(response):
                    problems.append("AcceptedNegativeData")
                if 400 <= response.status_code < 500 and not _error_shaped(response):
                    problems.append("4xx without the error shape")
                for problem in problems:
                    failures.append(f"{case.operation.label} [{kind}] "
                                    f"{response.status_code} {problem}: {case.body!r:.300}")

            try:
                run()
            except Unsatisfiable:
                pass  # no invalid request exists for an operation without parameters
    health = httpx.get(f"{server.url}/health", timeout=10).status_code
    generate = httpx.post(f"{server.url}/generate", timeout=60,
                          json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    by_status = collections.Counter(key.rsplit(" ", 1)[1] for key in statuses.elements())
    summary = {
        "operations": len(operations), "cases": cases, "statuses": dict(sorted(by_status.items())),
        "by_operation": dict(sorted(statuses.items())), "failures": len(failures),
        "health_after": health, "generate_after": generate.status_code,
    }
    SUMMARY.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "by_operation"}))
    assert not failures, "\n".join(failures[:40])
    assert not any(int(code) >= 500 for code in by_status)
    assert health == 200 and generate.status_code == 200
