"""The OpenAPI document as the server really behaves: the limits it enforces, what it answers.

FastAPI derives the document from the pydantic models, which stay lax on purpose (validation.py
and the OpenAI planner give TGI's and OpenAI's messages). This module adds to that document the
rules those validators apply, with this server's own limits, so that a client (or a fuzzer)
reading it knows which requests are accepted and which status codes and media types come back.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from tgserve.router.openai.params import PlanLimits, fim_tokens

JSON = dict[str, Any]

_TGI_ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
_OPENAI_ERROR = {"$ref": "#/components/schemas/OpenAIErrorResponse"}
_NULL = {"type": "null"}
# pydantic writes 2**64 - 1 as a float, which rounds up to 2**64.
_U64_MAX = 2**64 - 1

# Routes that accept a body, and the error shape each answers in.
_NATIVE_BODY_ROUTES = ("/", "/generate", "/generate_stream", "/tokenize")
_OPENAI_BODY_ROUTES = ("/v1/chat/completions", "/v1/completions", "/chat_tokenize")
# The event of each stream; a failure after the 200 is sent arrives as an error event instead.
_STREAMING = {
    "/": ("StreamResponse", _TGI_ERROR),
    "/generate_stream": ("StreamResponse", _TGI_ERROR),
    "/v1/chat/completions": ("ChatCompletionChunk", _OPENAI_ERROR),
    "/v1/completions": ("Completion", _OPENAI_ERROR),
}


def _value(prop: JSON) -> JSON:
    """The non-null branch of an optional property (the property itself when not optional)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return prop


def _narrow(schema: JSON, name: str, **keywords: Any) -> None:
    _value(schema["properties"][name]).update(keywords)


def _replace(schema: JSON, name: str, value: JSON) -> None:
    prop = schema["properties"][name]
    schema["properties"][name] = {
        k: v for k, v in prop.items() if k in ("title", "description", "default")
    } | value


def _optional(value: JSON) -> JSON:
    return {"anyOf": [value, _NULL]}


def _error(description: str, schema: JSON) -> JSON:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _copy_component(schemas: JSON, source: str, target: str, refs: dict[str, str]) -> None:
    """`target` as a copy of `source`, its references renamed (the looser body of a route)."""
    clone = copy.deepcopy(schemas[source])

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (refs.get(v, v) if k == "$ref" else rename(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [rename(v) for v in node]
        return node

    schemas[target] = rename(clone) | {"title": target}


def _native_rules(schemas: JSON, caps: PlanLimits) -> None:
    limits = caps.limits
    params = schemas["GenerateParameters"]
    _narrow(params, "best_of", minimum=1, maximum=limits.max_best_of)
    for name in ("temperature", "repetition_penalty"):
        _narrow(params, name, exclusiveMinimum=0)
    _narrow(params, "frequency_penalty", minimum=-2, maximum=2)
    _narrow(params, "top_k", minimum=1)
    for name in ("top_p", "typical_p"):
        _narrow(params, name, exclusiveMinimum=0, maximum=1)
    _narrow(params, "max_new_tokens", minimum=1, maximum=max(limits.max_total_tokens - 1, 1))
    params["properties"]["stop"]["maxItems"] = limits.max_stop_sequences
    _narrow(params, "truncate", minimum=1, maximum=limits.max_input_tokens)
    _narrow(params, "top_n_tokens", maximum=limits.max_top_n_tokens)
    _narrow(params, "seed", maximum=_U64_MAX)
    _replace(params, "grammar", {
        "type": "null",
        "description": "Grammar-constrained decoding is not supported by tgserve yet: any "
        "value other than null is refused.",
    })
    # null is read as the default, as clients that send every key expect.
    for name in ("do_sample", "stop", "watermark", "details", "decoder_input_details",
                 "ignore_eos"):
        prop = params["properties"][name]
        prop["anyOf"] = [{k: prop.pop(k) for k in ("type", "items", "maxItems") if k in prop},
                         _NULL]
    params["description"] = (
        "Rules no single field can state: `inputs` tokens (after `truncate`) + `max_new_tokens` "
        f"<= {limits.max_total_tokens} and `inputs` tokens <= {limits.max_input_tokens}; "
        "`best_of` > 1 needs sampling and no `seed`; streams refuse `best_of` > 1 and "
        "`decoder_input_details`."
    )
    for name in ("GenerateRequest", "CompatGenerateRequest"):
        _narrow(schemas[name], "inputs", minLength=1)
    stream = schemas["CompatGenerateRequest"]["properties"]["stream"]
    stream["anyOf"] = [{"type": stream.pop("type")}, _NULL]


_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}
_EMPTY: JSON = {"enum": [None, "", [], {}]}
# Fields of OpenAI's chat request that tgserve accepts only when they ask for nothing.
_NO_OP_VALUES: dict[str, JSON] = {
    "tools": _optional({"type": "array", "maxItems": 0}),
    "functions": _optional({"type": "array", "maxItems": 0}),
    "tool_choice": {"enum": [None, "none", "auto"]},
    "function_call": {"enum": [None, "none", "auto"]},
    "parallel_tool_calls": _optional({"type": "boolean"}),
    "response_format": _optional({
        "type": "object",
        "properties": {"type": {"enum": ["text"]}},
        "required": ["type"],
        "additionalProperties": False,
    }),
    "modalities": _optional({"type": "array", "items": {"enum": ["text"]},
                             "minItems": 1, "maxItems": 1}),
    "store": {"enum": [None, False]},
    "service_tier": {"enum": [None, "auto", "default"]},
}


def _openai_rules(schemas: JSON, caps: PlanLimits, vocab_size: int, fim: bool) -> None:
    limits = caps.limits
    message = schemas["ChatMessage"]
    _narrow(message, "role", enum=["system", "developer", "user", "assistant", "tool"])
    _replace(message, "content", {"anyOf": [
        {"type": "string"}, {"type": "array", "items": _TEXT_PART},
    ]})
    _narrow(message, "tool_calls", maxItems=0)
    message["required"] = ["role", "content"]
    message["additionalProperties"] = _EMPTY
    max_new = max(limits.max_total_tokens - 1, 1)
    stop = {"anyOf": [{"type": "string"},
                      {"type": "array", "items": {"type": "string"},
                       "maxItems": limits.max_stop_sequences}]}
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        body = schemas[name]
        _narrow(body, "n", maximum=caps.max_choices)
        _replace(body, "stop", _optional(stop))
        _narrow(body, "logit_bias", propertyNames={"pattern": "^[0-9]+$"})
        _narrow(body, "seed", maximum=_U64_MAX)
    chat = schemas["ChatCompletionRequest"]
    for name in ("max_tokens", "max_completion_tokens"):
        _narrow(chat, name, minimum=1, maximum=max_new)
    _narrow(chat, "top_logprobs", maximum=min(20, limits.max_top_n_tokens))
    for name in (
        "audio", "prediction", "reasoning_effort", "web_search_options", "verbosity",
        "tool_prompt",
    ):
        _replace(chat, name, {"type": "null", "description": "Not supported: null only."})
    for name, value in _NO_OP_VALUES.items():
        _replace(chat, name, value | {"description": "Not supported: accepted when it asks "
                                                     "for nothing."})
    chat["description"] = (
        "`top_logprobs` needs `logprobs`; prompt tokens + `max_tokens` <= "
        f"{limits.max_total_tokens}; `logit_bias` keys are token ids below {vocab_size}."
    )
    completion = schemas["CompletionRequest"]
    token_id = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    ids = {"type": "array", "items": token_id, "minItems": 1, "maxItems": limits.max_input_tokens}
    batch = caps.max_prompts
    _replace(completion, "prompt", {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
         "maxItems": batch},
        ids,
        {"type": "array", "items": ids, "minItems": 1, "maxItems": batch},
    ]})
    _narrow(completion, "max_tokens", maximum=max_new)
    _narrow(completion, "logprobs", maximum=min(20, limits.max_top_n_tokens))
    _narrow(completion, "best_of", maximum=limits.max_best_of)
    if not fim:
        _replace(completion, "suffix", {
            "type": "null",
            "description": "This model has no fill-in-the-middle tokens: null only.",
        })
    completion["description"] = (
        "`best_of` >= `n`, and above `n` at most "
        f"{limits.max_best_of} and not when streaming; prompts x `best_of` <= "
        f"{caps.max_choices}; `suffix` needs a text prompt, no `echo`, and a model with "
        "fill-in-the-middle tokens; `logit_bias` keys are token ids below "
        f"{vocab_size}; prompt tokens + `max_tokens` <= {limits.max_total_tokens}."
    )


def _sse_event(payload: JSON, done_marker: bool) -> JSON:
    """One server-sent event: its `data` is JSON (OpenAI's streams end with `[DONE]`)."""
    data: JSON = {"type": "string", "contentMediaType": "application/json",
                  "contentSchema": payload}
    if done_marker:
        data = {"anyOf": [{"const": "[DONE]"}, data]}
    return {"type": "object", "properties": {"data": data}, "required": ["data"]}


def _responses(paths: JSON, protected: frozenset[str] | None) -> None:
    for path, item in paths.items():
        for method, operation in item.items():
            responses = operation["responses"]
            if path in _OPENAI_BODY_ROUTES:
                responses.pop("422", None)  # their body errors are OpenAI's 400
            if method == "post" and path in _NATIVE_BODY_ROUTES:
                responses["400"] = _error("The body is not JSON, or not UTF-8", _TGI_ERROR)
                responses["415"] = _error("The body is not `application/json`", _TGI_ERROR)
                responses["422"] = _error("Input validation error", _TGI_ERROR)
            if method == "post":
                responses["413"] = _error("The body is over --payload-limit", _TGI_ERROR)
            if protected is not None and method == "post" and path in protected:
                responses["401"] = _error("Missing or wrong API key", _TGI_ERROR)
                operation["security"] = [{"apiKey": []}]
    stream = paths["/generate_stream"]["post"]["responses"]["200"]
    stream["description"] = (
        "Server-sent events, one StreamResponse per token; a request that breaks a validation "
        "rule gets a single `data: {error, error_type}` event instead."
    )
    del stream["content"]["application/json"]
    for path, (event, error) in _STREAMING.items():
        content = paths[path]["post"]["responses"]["200"]["content"]
        payload = {"anyOf": [{"$ref": f"#/components/schemas/{event}"}, error]}
        content["text/event-stream"] = {"schema": _sse_event(payload, path.startswith("/v1/"))}
    health = paths["/health"]["get"]["responses"]["200"]
    health.pop("content", None)
    paths["/metrics"]["get"]["responses"]["200"]["content"] = {
        "text/plain": {"schema": {"type": "string"}}
    }
    for parameter in paths["/v1/models/{name}"]["get"]["parameters"]:
        # The path converter matches no newline, and /v1/models/ is no route.
        parameter["schema"].update(minLength=1, pattern="^[^\n]+$")
    models = paths["/v1/models/{name}"]["get"]["responses"]
    models.clear()
    models["200"] = _error("The served model", {"$ref": "#/components/schemas/ModelCard"})
    # A name the path converter does not match (a newline, nothing) is the router's own 404.
    models["404"] = _error("No model of that name", {"anyOf": [_OPENAI_ERROR, _TGI_ERROR]})
    tokenize = paths["/tokenize"]["post"]["requestBody"]["content"]["application/json"]
    tokenize["schema"] = {"$ref": "#/components/schemas/TokenizeRequest"}
    chat_tokenize = paths["/chat_tokenize"]["post"]["requestBody"]["content"]["application/json"]
    chat_tokenize["schema"] = {"$ref": "#/components/schemas/ChatTokenizeRequest"}


def refine(
    spec: JSON, caps: PlanLimits, vocab_size: int, fim: bool, protected: frozenset[str] | None
) -> JSON:
    """`fim`: the model has fill-in-the-middle tokens; `protected`: the paths that need the API
    key, None when the server has none."""
    schemas = spec["components"]["schemas"]
    # /tokenize and /chat_tokenize read only the text: they accept what generation may refuse.
    _copy_component(schemas, "GenerateParameters", "TokenizeParameters", {})
    _copy_component(schemas, "GenerateRequest", "TokenizeRequest", {
        "#/components/schemas/GenerateParameters": "#/components/schemas/TokenizeParameters",
    })
    _copy_component(schemas, "ChatCompletionRequest", "ChatTokenizeRequest", {})
    # The pydantic bounds they keep still apply; pydantic writes the u64 one as a float.
    for loose in ("TokenizeParameters", "ChatTokenizeRequest"):
        _narrow(schemas[loose], "seed", maximum=_U64_MAX)
    _openai_rules(schemas, caps, vocab_size, fim)
    _native_rules(schemas, caps)
    _responses(spec["paths"], protected)
    if protected is not None:
        spec["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
    return spec


def install(
    app: FastAPI, caps: PlanLimits, tokenizer: Any, protected: frozenset[str] | None
) -> None:
    """`tokenizer`: the Hugging Face tokenizer, for the vocabulary size and FIM tokens."""
    vocab_size = len(tokenizer)
    fim = fim_tokens(tokenizer) is not None
    generate: Callable[[], JSON] = app.openapi

    def openapi() -> JSON:
        if app.openapi_schema is None:
            app.openapi_schema = refine(generate(), caps, vocab_size, fim, protected)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
