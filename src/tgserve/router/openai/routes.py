"""Thin handlers for the OpenAI-compatible routes: /v1/chat/completions, /v1/completions, models.

Handlers are module-level functions; what they share (the Infer, the chat template, the model
id) is the app's `state.openai`, an OpenAIContext that app.py sets.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from tgserve import __version__
from tgserve.router.chat import ChatTemplate, RequestError
from tgserve.router.errors import ValidationError, error_info
from tgserve.router.infer import Infer
from tgserve.router.middleware import CLIENT_CLOSED_REQUEST, until_disconnected
from tgserve.router.native.schemas import SimpleToken
from tgserve.router.openai.params import Plan, PlanLimits, chat_plan, chat_prompt, completion_plan
from tgserve.router.openai.run import (
    CompletionOffsets,
    Run,
    SSEChunks,
    accumulate,
    chat_choices,
    chat_logprobs,
    chosen,
)
from tgserve.router.openai.schemas import (
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatTokenizeResponse,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIErrorResponse,
)
from tgserve.router.settings import RouterSettings
from tgserve.router.streaming import SSEResponse
from tgserve.router.terms import TermsPolicy
from tgserve.router.types import GenerationError, IncompleteGenerationError, OverloadedError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- errors

_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) in OpenAI's shape; validation is a 400, as OpenAI answers."""
    param = code = None
    if isinstance(exc, RequestError):
        status, message, param, code = 400, str(exc), exc.param, exc.code or "invalid_request"
    elif isinstance(exc, ValidationError):
        status, message, code = 400, str(exc), "invalid_request"
    else:
        info = error_info(exc)
        status, message, code = info.status, info.message, info.error_type
        if isinstance(exc, (GenerationError, IncompleteGenerationError)):
            status = 500  # TGI's 424 is a server failure all the same
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return status, body


def error_json(exc: BaseException) -> JSONResponse:
    status, body = openai_error(exc)
    return JSONResponse(status_code=status, content=body, headers=error_info(exc).headers())


def _is_union_tag(part: str) -> bool:
    """pydantic names the union member that failed: `str`, `list[int]`, `function-after[…]`."""
    return part in ("str", "int", "float", "bool", "none") or "[" in part


def _param(loc: tuple[Any, ...]) -> str:
    """pydantic's error location as OpenAI's `param` (messages[0].content), union tags dropped."""
    out = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out or not _is_union_tag(str(part)):
            out += f".{part}" if out else str(part)
    return out


def body_error(errors: list[dict[str, Any]]) -> RequestError:
    first = errors[0] if errors else {"type": "missing", "loc": ("body",)}
    param = _param(tuple(first.get("loc", ())))
    kind = first.get("type")
    if kind == "json_invalid":
        return RequestError("the request body is not valid JSON", None, "invalid_json")
    if not param:
        return RequestError("the request body must be a JSON object", None)
    if kind == "extra_forbidden":
        return RequestError(f"Unrecognized request argument supplied: {param}", param)
    if kind == "missing":
        return RequestError(f"Missing required parameter: '{param}'", param)
    return RequestError(f"Invalid value for '{param}': {first.get('msg', 'invalid value')}", param)


class OpenAIRoute(APIRoute):
    """Every error of these routes, body parsing included, in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_json(body_error(list(exc.errors())))
            except HTTPException as exc:
                if exc.status_code != 400:
                    raise
                # FastAPI's answer to a body it cannot decode (not UTF-8), in OpenAI's shape.
                return error_json(RequestError(f"the request body is unreadable: {exc.detail}",
                                               None, "invalid_body"))
            except Exception as exc:
                if not isinstance(exc, (ValidationError, OverloadedError)):
                    log.exception("%s %s failed", request.method, request.url.path)
                return error_json(exc)

        return route


ERROR_DOCS: dict[int | str, dict[str, Any]] = {
    status: {"model": OpenAIErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request (the `param` names the field)"),
        (429, "Model is overloaded"),
        (500, "Generation failed"),
    )
}

# ---------------------------------------------------------------- responses


def _ids(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class _Meta(BaseModel):
    id: str
    created: int
    model: str
    system_fingerprint: str


def _headers(plan: Plan, compute_type: str, run: Run | None = None) -> dict[str, str]:
    headers = {
        "x-compute-type": compute_type,
        "x-compute-characters": str(plan.characters),
        "x-prompt-tokens": str(plan.prompt_tokens),
    }
    if run is None:
        headers["X-Accel-Buffering"] = "no"
    else:
        headers["x-generated-tokens"] = str(run.completion_tokens)
    return headers


async def chat_chunks(run: Run, meta: _Meta) -> AsyncIterator[BaseModel]:
    fields = meta.model_dump()  # once: every chunk of a stream shares them
    async for choice, delta in run.deltas():
        logprobs = chat_logprobs(list(delta.logprobs)) if run.plan.want_logprobs else None
        yield ChatCompletionChunk(
            **fields,
            choices=[
                ChatChunkChoice(
                    index=choice.index,
                    delta=ChatDelta(content=delta.text),
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                )
            ],
        )
    if run.plan.include_usage:
        yield ChatCompletionChunk(**fields, choices=[], usage=run.usage())


async def completion_chunks(run: Run, meta: _Meta) -> AsyncIterator[BaseModel]:
    offsets = [CompletionOffsets(len(c.echo or "")) for c in run.plan.choices]
    fields = meta.model_dump()
    async for choice, delta in run.deltas():
        logprobs = offsets[choice.index].shape(delta.logprobs) if run.plan.want_logprobs else None
        yield Completion(
            **fields,
            choices=[
                CompletionChoice(
                    index=choice.index,
                    text=delta.text,
                    logprobs=logprobs,
                    finish_reason=delta.finish_reason,
                )
            ],
        )
    if run.plan.include_usage:
        yield Completion(**fields, choices=[], usage=run.usage())


def completion_choices(run: Run, results: list[Any]) -> list[CompletionChoice]:
    out = []
    for index, choice, result in chosen(run, results):
        offsets = CompletionOffsets(len(choice.echo or ""))
        logprobs = offsets.shape(result.logprobs) if run.plan.want_logprobs else None
        out.append(
            CompletionChoice(
                index=index,
                text=result.text,
                logprobs=logprobs,
                finish_reason=result.finish_reason or "stop",
            )
        )
    return out


# ---------------------------------------------------------------- routes

FINGERPRINT = f"{__version__}-native"


@dataclass(frozen=True)
class OpenAIContext:
    """What the OpenAI handlers share, kept on the app as `state.openai`."""

    infer: Infer
    template: ChatTemplate | None
    caps: PlanLimits
    model_id: str
    compute_type: str
    created_at: int  # the models' `created`: when the server started
    terms: TermsPolicy = TermsPolicy()

    @classmethod
    def create(
        cls, infer: Infer, settings: RouterSettings, template: ChatTemplate | None
    ) -> OpenAIContext:
        caps = PlanLimits(
            infer.limits, settings.max_concurrent_requests, settings.max_client_batch_size
        )
        return cls(infer, template, caps, settings.model_id, settings.compute_type,
                   int(time.time()), settings.terms())

    def meta(self, prefix: str) -> _Meta:
        return _Meta(
            id=_ids(prefix),
            created=int(time.time()),
            model=self.model_id,
            system_fingerprint=FINGERPRINT,
        )


def _context(request: Request) -> OpenAIContext:
    return request.app.state.openai


async def _execute(
    request: Request,
    plan: Plan,
    prefix: str,
    chunks: Callable[[Run, _Meta], AsyncIterator[BaseModel]],
    whole: Callable[[Run, _Meta], Awaitable[BaseModel]],
    inputs: str,
) -> Response:
    context = _context(request)
    infer = context.infer
    stack = ExitStack()
    client_left = False
    try:
        track = stack.enter_context(infer.telemetry.track(inputs, plan.stream))
        track.validated(plan.choices[0].request)
        stack.enter_context(infer.limiter.permit(len(plan.choices)))
        run = Run(infer, plan, track)
        if plan.stream:
            events = SSEChunks(chunks(run, context.meta(prefix)), stack,
                               lambda e: openai_error(e)[1])
            return SSEResponse(events, headers=_headers(plan, context.compute_type))
        finished, body = await until_disconnected(request, whole(run, context.meta(prefix)))
        if not finished or body is None:
            client_left = True
            raise asyncio.CancelledError()  # recorded as dropped, as the native routes do
    except BaseException as exc:
        stack.__exit__(type(exc), exc, exc.__traceback__)
        if client_left:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        raise
    stack.close()
    return Response(
        content=body.model_dump_json(),
        media_type="application/json",
        headers=_headers(plan, context.compute_type, run),
    )


async def _plan_or_fail(infer: Infer, inputs: str, fn: Callable[..., Plan], *args: Any) -> Plan:
    try:
        return await infer.tokenizer.run(fn, *args)
    except Exception as exc:
        infer.telemetry.request_failed(exc, inputs)
        raise


async def _whole_chat(run: Run, m: _Meta) -> BaseModel:
    results = await accumulate(run)
    return ChatCompletion(**m.model_dump(), choices=chat_choices(run, results), usage=run.usage())


async def _whole_completion(run: Run, m: _Meta) -> BaseModel:
    results = await accumulate(run)
    return Completion(
        **m.model_dump(), choices=completion_choices(run, results), usage=run.usage()
    )


# Generation routes take the API key; the open routes never do.
generation_routes = APIRouter(tags=["OpenAI"], route_class=OpenAIRoute)
open_routes = APIRouter(tags=["OpenAI"], route_class=OpenAIRoute)


@generation_routes.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses=ERROR_DOCS,
    summary="Generate a chat completion (OpenAI compatible)",
)
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
    context = _context(request)
    infer = context.infer
    terms = context.terms.read(request.headers)
    plan = await _plan_or_fail(infer, "", chat_plan, req, context.template, infer.tokenizer,
                               context.caps)
    plan = plan.with_terms(terms)
    return await _execute(
        request, plan, "chatcmpl", chat_chunks, _whole_chat, plan.choices[0].request.inputs
    )


@generation_routes.post(
    "/v1/completions",
    response_model=Completion,
    responses=ERROR_DOCS,
    summary="Complete a prompt (OpenAI compatible)",
)
async def completions(req: CompletionRequest, request: Request) -> Response:
    context = _context(request)
    infer = context.infer
    terms = context.terms.read(request.headers)
    plan = await _plan_or_fail(infer, "", completion_plan, req, infer.tokenizer, context.caps)
    plan = plan.with_terms(terms)
    return await _execute(
        request, plan, "cmpl", completion_chunks, _whole_completion, plan.choices[0].request.inputs
    )


@open_routes.get("/v1/models", response_model=ModelList, summary="The served model")
async def models(request: Request) -> ModelList:
    context = _context(request)
    card = ModelCard(id=context.model_id, created=context.created_at, owned_by=context.model_id)
    return ModelList(data=[card])


@open_routes.get(
    "/v1/models/{name:path}",
    response_model=ModelCard,
    responses=ERROR_DOCS,
    summary="One model",
)
async def model(name: str, request: Request) -> Response:
    context = _context(request)
    if name != context.model_id:
        body = {
            "error": {
                "message": f"The model '{name}' does not exist",
                "param": "model",
                "type": "not_found_error",
                "code": "model_not_found",
            }
        }
        return JSONResponse(status_code=404, content=body)
    card = ModelCard(id=context.model_id, created=context.created_at, owned_by=context.model_id)
    return JSONResponse(card.model_dump())


@generation_routes.post(
    "/chat_tokenize",
    response_model=ChatTokenizeResponse,
    responses=ERROR_DOCS,
    summary="Template and tokenize a chat request",
)
async def chat_tokenize(req: ChatCompletionRequest, request: Request) -> ChatTokenizeResponse:
    context = _context(request)
    tokenizer = context.infer.tokenizer
    text = await tokenizer.run(chat_prompt, req, context.template)
    tokens = await tokenizer.tokenize_async(text, False)
    return ChatTokenizeResponse(
        tokenize_response=[SimpleToken(**t) for t in tokens], templated_text=text
    )
