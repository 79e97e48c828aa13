"""Thin handlers for TGI's native routes: translate HTTP to Infer calls and back.

Handlers are module-level functions; what they share (the Infer, the /info answer) is the
app's `state.native`, a NativeContext that app.py sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tgserve import __version__
from tgserve.router.infer import GenerateOutput, Infer
from tgserve.router.lifecycle import READY_PATH, RETRY_AFTER_S, not_ready_body
from tgserve.router.middleware import CLIENT_CLOSED_REQUEST, until_disconnected
from tgserve.router.native.schemas import (
    CompatGenerateRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Info,
    NotReady,
    Readiness,
    SimpleToken,
    StreamResponse,
)
from tgserve.router.settings import RouterSettings
from tgserve.router.streaming import SSEResponse, sse_stream
from tgserve.router.terms import TermsPolicy


def _error_doc(description: str, error: str, error_type: str) -> dict[str, Any]:
    example = {"error": error, "error_type": error_type}
    return {
        "model": ErrorResponse,
        "description": description,
        "content": {"application/json": {"example": example}},
    }


GENERATE_ERRORS: dict[int | str, dict[str, Any]] = {
    422: _error_doc("Input validation error", "Input validation error", "validation"),
    424: _error_doc("Generation Error", "Request failed during generation", "generation"),
    429: _error_doc("Model is overloaded", "Model is overloaded", "overloaded"),
    500: _error_doc("Incomplete generation", "Incomplete generation", "incomplete_generation"),
}


def _ms(seconds: float) -> str:
    return str(int(max(seconds, 0.0) * 1000))


def generate_headers(output: GenerateOutput, inputs: str, compute_type: str) -> dict[str, str]:
    t = output.timings
    inference = t.end - t.started
    return {
        "x-compute-type": compute_type,
        "x-compute-time": repr(max(t.end - t.start, 0.0)),
        "x-compute-characters": str(len(inputs)),
        "x-total-time": _ms(t.end - t.start),
        "x-validation-time": _ms(t.queued - t.start),
        "x-queue-time": _ms(t.started - t.queued),
        "x-inference-time": _ms(inference),
        "x-time-per-token": _ms(inference / max(output.generated_tokens, 1)),
        "x-prompt-tokens": str(output.input_length),
        "x-generated-tokens": str(output.generated_tokens),
    }


def stream_headers(inputs: str, compute_type: str) -> dict[str, str]:
    return {
        "x-compute-type": compute_type,
        "x-compute-characters": str(len(inputs)),
        "X-Accel-Buffering": "no",
    }


def build_info(settings: RouterSettings, info: dict[str, Any]) -> Info:
    base: dict[str, Any] = {
        "model_id": settings.model_id,
        "max_concurrent_requests": settings.max_concurrent_requests,
        "max_best_of": settings.max_best_of,
        "max_stop_sequences": settings.max_stop_sequences,
        "max_input_tokens": settings.max_input_tokens,
        "max_total_tokens": settings.max_total_tokens,
        "validation_workers": settings.validation_workers,
        "max_client_batch_size": settings.max_client_batch_size,
        "router": "text-generation-router",
        "version": __version__,
    }
    return Info(**(base | info))


@dataclass(frozen=True)
class NativeContext:
    """What the native handlers share, kept on the app as `state.native`."""

    infer: Infer
    info: Info
    compute_type: str
    # Like TGI: `/` returns the prompt too unless the model is known not to be a text generator.
    full_text_default: bool
    terms: TermsPolicy = TermsPolicy()

    @classmethod
    def create(cls, infer: Infer, settings: RouterSettings, info: dict[str, Any]) -> NativeContext:
        answer = build_info(settings, info)
        full_text_default = answer.model_pipeline_tag in (None, "text-generation")
        return cls(infer, answer, settings.compute_type, full_text_default, settings.terms())


def _context(request: Request) -> NativeContext:
    return request.app.state.native


async def _run_generate(request: Request, req: GenerateRequest, as_list: bool) -> Response:
    context = _context(request)
    terms = context.terms.read(request.headers)
    finished, output = await until_disconnected(request, context.infer.generate(req, terms=terms))
    if not finished or output is None:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    body = output.response.model_dump_json()
    return Response(
        content="[" + body + "]" if as_list else body,
        media_type="application/json",
        headers=generate_headers(output, req.inputs, context.compute_type),
    )


def _run_stream(request: Request, req: GenerateRequest) -> SSEResponse:
    context = _context(request)
    terms = context.terms.read(request.headers)
    events = sse_stream(context.infer.generate_stream(req, terms=terms))
    return SSEResponse(events, headers=stream_headers(req.inputs, context.compute_type))


# Generation routes take the API key; the open routes never do.
generation_routes = APIRouter(tags=["Text Generation Inference"])
open_routes = APIRouter(tags=["Text Generation Inference"])


@generation_routes.post(
    "/generate",
    response_model=GenerateResponse,
    responses=GENERATE_ERRORS,
    summary="Generate tokens",
)
async def generate(req: GenerateRequest, request: Request) -> Response:
    return await _run_generate(request, req, as_list=False)


@generation_routes.post(
    "/generate_stream",
    response_model=StreamResponse,
    responses=GENERATE_ERRORS,
    summary="Generate a stream of token using Server-Sent Events",
)
async def generate_stream(req: GenerateRequest, request: Request) -> SSEResponse:
    return _run_stream(request, req)


@generation_routes.post(
    "/",
    response_model=list[GenerateResponse],
    responses=GENERATE_ERRORS,
    summary="Generate tokens if `stream == false` or a stream of token if `stream == true`",
)
async def compat_generate(req: CompatGenerateRequest, request: Request) -> Any:
    params = req.parameters
    if params.return_full_text is None:
        params = params.model_copy(update={"return_full_text": _context(request).full_text_default})
    inner = GenerateRequest(inputs=req.inputs, parameters=params)
    if req.stream:
        return _run_stream(request, inner)
    return await _run_generate(request, inner, as_list=True)


@generation_routes.post("/tokenize", response_model=list[SimpleToken], summary="Tokenize inputs")
async def tokenize(req: GenerateRequest, request: Request) -> Response:
    tokens = await _context(request).infer.tokenize(req)
    return JSONResponse([t.model_dump() for t in tokens])


@open_routes.get("/info", response_model=Info, summary="Text Generation Inference endpoint info")
async def get_info(request: Request) -> Response:
    info = _context(request).info
    return Response(content=info.model_dump_json(), media_type="application/json")


async def health(request: Request) -> Response:
    if await _context(request).infer.health():
        return Response(status_code=200)
    return JSONResponse(
        status_code=503, content={"error": "unhealthy", "error_type": "healthcheck"}
    )


async def ready(request: Request) -> Response:
    reason = await _context(request).infer.readiness()
    if reason is None:
        return JSONResponse({"ready": True, "reason": None})
    return JSONResponse(status_code=503, headers={"retry-after": str(RETRY_AFTER_S)},
                        content=not_ready_body(reason, f"not ready: {reason}"))


HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Everything is working fine"},
    503: {"model": ErrorResponse, "description": "Text generation inference is down"},
}
open_routes.add_api_route(
    "/health",
    health,
    methods=["GET"],
    responses=HEALTH_RESPONSES,
    summary="Health check method",
)
open_routes.add_api_route(
    READY_PATH,
    ready,
    methods=["GET"],
    response_model=Readiness,
    responses={503: {"model": NotReady, "description": "Not ready, and why: warming_up, "
                     "draining, shard_unreachable or engine_stalled"}},
    summary="Readiness: whether to send requests here now, and why not",
)
for _path in ("/", "/ping"):
    open_routes.add_api_route(
        _path, health, methods=["GET"], include_in_schema=False, name=f"health{_path}"
    )
