"""Validation rules, their order and exact messages; JSON schema errors, 400, 413, 415 and 429."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from tgserve.router.app import create_app
from tgserve.router.errors import ValidationError
from tgserve.router.infer import Infer
from tgserve.router.native.schemas import GenerateParameters
from tgserve.router.native.validation import Limits, validate
from tgserve.router.settings import RouterSettings
from tgserve.router.tokenization import RouterTokenizer
from tgserve.router.types import (
    EndEvent,
    FinishReason,
    GeneratedText,
    InferEvent,
    Token,
    ValidRequest,
)

JSON = {"content-type": "application/json"}
LIMITS = Limits(
    max_best_of=2,
    max_stop_sequences=2,
    max_top_n_tokens=3,
    max_input_tokens=10,
    max_total_tokens=16,
)


def encode(text: str, add_special_tokens: bool) -> list[int]:
    """One token per word, plus a BOS token when special tokens are added."""
    ids = [7] * len(text.split())
    return [1, *ids] if add_special_tokens else ids


def words(n: int) -> str:
    return " ".join(["w"] * n)  # n words -> n + 1 tokens with BOS


# (parameters, inputs, exact message), in TGI's order of checks.
RULES: list[tuple[dict[str, Any], str, str]] = [
    ({"best_of": 3, "do_sample": True}, "hi", "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 0}, "hi", "`best_of` must be > 0 and <= 2. Given: 0"),
    ({"best_of": 2}, "hi", "you must use sampling when `best_of` is > 1"),
    ({"temperature": 0.0}, "hi", "`temperature` must be strictly positive"),
    ({"temperature": -1.0}, "hi", "`temperature` must be strictly positive"),
    ({"repetition_penalty": 0.0}, "hi", "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "hi", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"frequency_penalty": -2.1}, "hi", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 0.0}, "hi", "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 1.5}, "hi", "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 0.0}, "hi", "`typical_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.01}, "hi", "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "hi", "`top_k` must be strictly positive"),
    ({"top_k": -3}, "hi", "`top_k` must be strictly positive"),
    ({"max_new_tokens": 0}, "hi", "`max_new_tokens` must be strictly positive"),
    ({"stop": ["a", "b", "c"]}, "hi", "`stop` supports up to 2 stop sequences. Given: 3"),
    (
        {"best_of": 2, "do_sample": True, "seed": 5},
        "hi",
        "`seed` must not be set when `best_of` > 1",
    ),
    ({"top_n_tokens": 4}, "hi", "`top_n_tokens` must be >= 0 and <= 3. Given: 4"),
    ({}, "", "`inputs` cannot be empty"),
    ({"truncate": 0}, "hi", "`truncate` must be strictly positive and less than 10. Given: 0"),
    ({"truncate": 11}, "hi", "`truncate` must be strictly positive and less than 10. Given: 11"),
    (
        {"max_new_tokens": 11},
        words(5),
        "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 6 `inputs` tokens and 11 "
        "`max_new_tokens`",
    ),
    ({}, words(11), "`inputs` must have less than 10 tokens. Given: 12"),
    ({"max_new_tokens": 2}, words(11), "`inputs` must have less than 10 tokens. Given: 12"),
    ({"grammar": {"type": "regex", "value": "a+"}}, "hi",
     "grammar is not supported yet by tgserve"),
    ({"grammar": {"type": "json", "value": {"properties": {}}}}, "hi",
     "grammar is not supported yet by tgserve"),
    # Order: the earlier rule wins when several are broken.
    ({"temperature": 0.0, "top_p": 0.0}, "hi", "`temperature` must be strictly positive"),
    ({"top_p": 0.0, "top_k": 0}, "hi", "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 0.0, "top_k": 0}, "hi", "`typical_p` must be > 0.0 and < 1.0"),
    (
        {"max_new_tokens": 0, "stop": ["a", "b", "c"]},
        "hi",
        "`max_new_tokens` must be strictly positive",
    ),
    ({"top_n_tokens": 9}, "", "`top_n_tokens` must be >= 0 and <= 3. Given: 9"),
    ({"truncate": 0}, words(20), "`truncate` must be strictly positive and less than 10. Given: 0"),
    (
        {"max_new_tokens": 20, "grammar": {"type": "regex", "value": "a"}},
        words(20),
        "`inputs` tokens + `max_new_tokens` must be <= 16. Given: 21 `inputs` tokens and 20 "
        "`max_new_tokens`",
    ),
    ({"best_of": 2, "temperature": 0.0}, "hi", "`temperature` must be strictly positive"),
]


def rule_id(rule: tuple[dict[str, Any], str, str]) -> str:
    return ",".join(rule[0]) or "inputs"


@pytest.mark.parametrize("params,inputs,message", RULES, ids=[rule_id(r) for r in RULES])
def test_validate_rule_message(params: dict[str, Any], inputs: str, message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate(GenerateParameters(**params), inputs, encode, LIMITS)
    assert str(info.value) == message


def test_disable_grammar_support_gives_tgis_message() -> None:
    limits = Limits(grammar_support=False)
    with pytest.raises(ValidationError) as info:
        validate(GenerateParameters(grammar={"type": "regex", "value": "a+"}), "hi", encode, limits)
    assert str(info.value) == "grammar is not supported"


def test_best_of_disabled_when_max_best_of_is_one() -> None:
    limits = Limits(max_best_of=1)
    with pytest.raises(ValidationError) as info:
        validate(GenerateParameters(best_of=2, do_sample=True), "hi", encode, limits)
    assert str(info.value) == "`best_of` != 1 is not allowed for this endpoint"


@pytest.mark.parametrize(
    "params,message",
    [
        (
            {"best_of": 2, "do_sample": True},
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        (
            {"decoder_input_details": True},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
    ],
)
def test_stream_only_rules(params: dict[str, Any], message: str) -> None:
    validate(GenerateParameters(**params), "hi", encode, LIMITS)  # fine without streaming
    with pytest.raises(ValidationError) as info:
        validate(GenerateParameters(**params), "hi", encode, LIMITS, stream=True)
    assert str(info.value) == message


def test_tokenizer_failure_is_a_validation_error() -> None:
    def broken(text: str, add_special_tokens: bool) -> list[int]:
        raise RuntimeError("boom")

    with pytest.raises(ValidationError) as info:
        validate(GenerateParameters(), "hi", broken, LIMITS)
    assert str(info.value) == "tokenizer error boom"


def test_neutral_top_p_and_typical_p_are_accepted() -> None:
    # Deliberate difference from TGI, which rejects the documented neutral value 1.0.
    request = validate(GenerateParameters(top_p=1.0, typical_p=1.0), "hi", encode, LIMITS)
    assert request.parameters.top_p == 1.0 and request.parameters.typical_p == 1.0
    assert not request.parameters.do_sample


def test_max_new_tokens_defaults_to_the_remaining_budget() -> None:
    request = validate(GenerateParameters(), words(4), encode, LIMITS)
    assert request.input_length == 5
    assert request.stopping.max_new_tokens == 16 - 5


def test_truncate_keeps_the_last_tokens() -> None:
    def numbered(text: str, add_special_tokens: bool) -> list[int]:
        return [int(w) for w in text.split()]

    request = validate(GenerateParameters(truncate=3), "1 2 3 4 5", numbered, LIMITS)
    assert request.input_ids == (3, 4, 5)
    assert request.truncate == 3


def test_seed_is_random_when_sampling_and_kept_when_given() -> None:
    seeds = {
        validate(GenerateParameters(do_sample=True), "hi", encode, LIMITS).parameters.seed
        for _ in range(5)
    }
    assert len(seeds) > 1 and all(0 <= s < 2**64 for s in seeds)
    given = validate(GenerateParameters(do_sample=True, seed=42), "hi", encode, LIMITS)
    assert given.parameters.seed == 42
    greedy = validate(GenerateParameters(), "hi", encode, LIMITS)
    assert greedy.parameters.seed == 0 and not greedy.parameters.do_sample


def test_request_fields_are_carried_over() -> None:
    params = GenerateParameters(
        temperature=0.5,
        top_k=4,
        repetition_penalty=1.2,
        frequency_penalty=0.5,
        stop=["x"],
        max_new_tokens=3,
        top_n_tokens=2,
        decoder_input_details=True,
        watermark=True,
        ignore_eos=True,
    )
    request = validate(params, "a b", encode, LIMITS)
    assert request.input_ids == (1, 7, 7)
    assert request.parameters.do_sample  # a warper forces sampling, as in the shard
    assert request.parameters.temperature == 0.5 and request.parameters.top_k == 4
    assert request.parameters.repetition_penalty == 1.2
    assert request.parameters.frequency_penalty == 0.5 and request.parameters.watermark
    assert request.stopping.stop_sequences == ("x",) and request.stopping.max_new_tokens == 3
    assert request.stopping.ignore_eos_token
    assert request.top_n_tokens == 2 and request.decoder_input_details


def test_special_tokens_can_be_left_out() -> None:
    request = validate(GenerateParameters(), "a b", encode, LIMITS, add_special_tokens=False)
    assert request.input_ids == (7, 7) and not request.add_special_tokens


# ---- through HTTP --------------------------------------------------------------------------


class OneTokenBackend:
    """Answers every request with one token; records what it was asked."""

    def __init__(self) -> None:
        self.requests: list[ValidRequest] = []

    async def schedule(self, request: ValidRequest) -> AsyncIterator[InferEvent]:
        self.requests.append(request)
        now = time.monotonic()
        yield EndEvent(
            Token(7, " w", -0.5), [], GeneratedText(" w", 1, FinishReason.LENGTH, None), now, now
        )

    async def health(self) -> bool:
        return True


def make_tokenizer() -> RouterTokenizer:
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "w": 7}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return RouterTokenizer(fast, validation_workers=1)


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[RouterTokenizer]:
    tok = make_tokenizer()
    yield tok
    tok.close()


def make_client(tokenizer: RouterTokenizer, **settings: Any) -> tuple[TestClient, Infer]:
    config = RouterSettings(
        model_id="tiny",
        max_best_of=2,
        max_stop_sequences=2,
        max_top_n_tokens=3,
        max_input_tokens=10,
        max_total_tokens=16,
        **settings,
    )
    infer = Infer(OneTokenBackend(), tokenizer, config.limits(), config.max_concurrent_requests)
    return TestClient(create_app(infer, {}, config)), infer


@pytest.fixture(scope="module")
def client(tokenizer: RouterTokenizer) -> TestClient:
    return make_client(tokenizer, payload_limit=1000)[0]


@pytest.mark.parametrize("params,inputs,message", RULES, ids=[rule_id(r) for r in RULES])
def test_http_rule_is_422_validation(
    client: TestClient, params: dict[str, Any], inputs: str, message: str
) -> None:
    response = client.post("/generate", json={"inputs": inputs, "parameters": params})
    assert response.status_code == 422
    assert response.json() == {
        "error": f"Input validation error: {message}",
        "error_type": "validation",
    }


@pytest.mark.parametrize(
    "body,message",
    [
        ({"inputs": 5}, "`inputs`: Input should be a valid string, got 5"),
        ({"parameters": {}}, "`inputs`: Field required"),
        (
            {"inputs": "hi", "parameters": {"top_k": "5"}},
            '`parameters.top_k`: Input should be a valid integer, got "5"',
        ),
        (
            {"inputs": "hi", "parameters": {"temperature": "hot"}},
            '`parameters.temperature`: Input should be a valid number, got "hot"',
        ),
        (
            {"inputs": "hi", "parameters": {"details": "yes"}},
            '`parameters.details`: Input should be a valid boolean, got "yes"',
        ),
        (
            {"inputs": "hi", "parameters": {"stop": "x"}},
            '`parameters.stop`: Input should be a valid list, got "x"',
        ),
        (
            {"inputs": "hi", "parameters": {"stop": [1]}},
            "`parameters.stop.0`: Input should be a valid string, got 1",
        ),
        (
            {"inputs": "hi", "parameters": {"max_new_tokens": -1}},
            "`parameters.max_new_tokens`: Input should be greater than or equal to 0, got -1",
        ),
        (
            {"inputs": "hi", "parameters": {"seed": -1}},
            "`parameters.seed`: Input should be greater than or equal to 0, got -1",
        ),
        (
            {"inputs": "hi", "parameters": {"best_of": 1.5}},
            "`parameters.best_of`: Input should be a valid integer, got 1.5",
        ),
        (
            {"inputs": "hi", "parameters": []},
            "`parameters`: Input should be a valid dictionary or object to extract fields from, "
            "got []",
        ),
        (
            {"inputs": "hi", "parameters": {"grammar": {"type": "xml", "value": ""}}},
            "`parameters.grammar`: Input tag 'xml' found using 'type' does not match any of the "
            "expected tags: 'json', 'json_object', 'regex', 'json_schema', got {\"type\": \"xml\", "
            '"value": ""}',
        ),
    ],
)
def test_wrong_json_types_name_the_field(
    client: TestClient, body: dict[str, Any], message: str
) -> None:
    response = client.post("/generate", json=body)
    assert response.status_code == 422
    assert response.json() == {
        "error": f"Input validation error: {message}",
        "error_type": "validation",
    }


def test_non_finite_numbers_are_rejected_by_the_schema(client: TestClient) -> None:
    body = b'{"inputs": "hi", "parameters": {"temperature": NaN}}'
    response = client.post("/generate", content=body, headers=JSON)
    assert response.status_code == 422
    assert response.json()["error"] == (
        "Input validation error: `parameters.temperature`: Input should be a finite number, got NaN"
    )


def test_nulls_mean_defaults(client: TestClient) -> None:
    body = {"inputs": "hi", "parameters": {"stop": None, "details": None, "top_k": None}}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("path", ["/generate", "/generate_stream", "/", "/tokenize"])
def test_malformed_json_is_400(client: TestClient, path: str) -> None:
    response = client.post(path, content=b'{"inputs": ', headers=JSON)
    assert response.status_code == 400
    assert response.json() == {
        "error": "Failed to parse the request body as JSON: Expecting value at character 11",
        "error_type": "validation",
    }


def test_body_without_content_type_is_read_as_json(client: TestClient) -> None:
    response = client.post("/generate", content=b'{"inputs": "w"}')
    assert response.status_code == 200
    assert response.json() == {"generated_text": " w"}


def test_non_json_content_type_is_415(client: TestClient) -> None:
    response = client.post(
        "/generate",
        content=b"inputs=w",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 415
    assert response.json()["error_type"] == "validation"


def test_body_that_is_not_an_object(client: TestClient) -> None:
    response = client.post("/generate", json=[1])
    assert response.status_code == 422
    assert response.json()["error"].startswith("Input validation error: `body`: Input should be")


def test_payload_limit_413_announced(client: TestClient) -> None:
    response = client.post("/generate", json={"inputs": "w" * 2000})
    assert response.status_code == 413
    assert response.json() == {
        "error": "Payload too large: the request body exceeds the limit of 1000 bytes",
        "error_type": "payload_too_large",
    }


def test_payload_limit_413_chunked_without_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"inputs": "'
        for _ in range(20):
            yield b"w" * 100
        yield b'"}'

    response = client.post("/generate", content=chunks(), headers=JSON)
    assert response.status_code == 413


def test_payload_under_limit_is_served(client: TestClient) -> None:
    response = client.post("/generate", json={"inputs": "w " * 5})
    assert response.status_code == 200


def test_overload_is_429(tokenizer: RouterTokenizer) -> None:
    client, infer = make_client(tokenizer, max_concurrent_requests=1)
    with infer.limiter.permit():  # another request holds the only permit
        response = client.post("/generate", json={"inputs": "w"})
        assert response.status_code == 429
        assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        stream = client.post("/generate_stream", json={"inputs": "w"})
        assert stream.status_code == 200
        assert stream.text == (
            'data: {"error":"Model is overloaded","error_type":"overloaded"}\n\n'
        )
    assert client.post("/generate", json={"inputs": "w"}).status_code == 200
    assert infer.limiter.in_flight == 0


def test_best_of_takes_one_permit_per_sequence(tokenizer: RouterTokenizer) -> None:
    client, _ = make_client(tokenizer, max_concurrent_requests=1)
    body = {"inputs": "w", "parameters": {"best_of": 2, "do_sample": True}}
    assert client.post("/generate", json=body).status_code == 429
