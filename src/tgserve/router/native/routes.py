"""Thin handlers for TGI's native routes: translate HTTP to Infer calls and back."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tgserve.router.infer import GenerateOutput, Infer
from tgserve.router.native.schemas import (
    CompatGenerateRequest,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Info,
    SimpleToken,
    StreamResponse,
)
from tgserve.router.streaming import SSEResponse, sse_stream

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads it, but logs should not say 200
_DISCONNECT_POLL_S = 0.05


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


async def _wait_for_disconnect(request: Request) -> None:
    # The body is already read, so the next ASGI message is the client going away.
    while (await request.receive())["type"] != "http.disconnect":
        await anyio.sleep(_DISCONNECT_POLL_S)  # never spin on an unexpected message


async def until_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Race `work` against the client leaving; when it leaves, `work` is cancelled at once."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return True, task.result()
        return False, None
    finally:
        for t in (task, watcher):
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(task, watcher, return_exceptions=True)


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


def native_router(infer: Infer, info: Info, compute_type: str) -> tuple[APIRouter, APIRouter]:
    """Returns (generation routes, which take the API key; open routes, which never do)."""
    generation = APIRouter(tags=["Text Generation Inference"])
    open_routes = APIRouter(tags=["Text Generation Inference"])
    # Like TGI: `/` returns the prompt too unless the model is known not to be a text generator.
    full_text_default = info.model_pipeline_tag in (None, "text-generation")

    async def run_generate(request: Request, req: GenerateRequest, as_list: bool) -> Response:
        finished, output = await until_disconnected(request, infer.generate(req))
        if not finished or output is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        body = output.response.model_dump_json()
        return Response(
            content="[" + body + "]" if as_list else body,
            media_type="application/json",
            headers=generate_headers(output, req.inputs, compute_type),
        )

    def run_stream(req: GenerateRequest) -> SSEResponse:
        events = sse_stream(infer.generate_stream(req))
        return SSEResponse(events, headers=stream_headers(req.inputs, compute_type))

    @generation.post(
        "/generate",
        response_model=GenerateResponse,
        responses=GENERATE_ERRORS,
        summary="Generate tokens",
    )
    async def generate(req: GenerateRequest, request: Request) -> Response:
        return await run_generate(request, req, as_list=False)

    @generation.post(
        "/generate_stream",
        response_model=StreamResponse,
        responses=GENERATE_ERRORS,
        summary="Generate a stream of token using Server-Sent Events",
    )
    async def generate_stream(req: GenerateRequest) -> SSEResponse:
        return run_stream(req)

    @generation.post(
        "/",
        response_model=list[GenerateResponse],
        responses=GENERATE_ERRORS,
        summary="Generate tokens if `stream == false` or a stream of token if `stream == true`",
    )
    async def compat_generate(req: CompatGenerateRequest, request: Request) -> Any:
        params = req.parameters
        if params.return_full_text is None:
            params = params.model_copy(update={"return_full_text": full_text_default})
        inner = GenerateRequest(inputs=req.inputs, parameters=params)
        if req.stream:
            return run_stream(inner)
        return await run_generate(request, inner, as_list=True)

    @generation.post("/tokenize", response_model=list[SimpleToken], summary="Tokenize inputs")
    async def tokenize(req: GenerateRequest) -> Response:
        tokens = await infer.tokenize(req)
        return JSONResponse([t.model_dump() for t in tokens])

    @open_routes.get(
        "/info", response_model=Info, summary="Text Generation Inference endpoint info"
    )
    async def get_info() -> Response:
        return Response(content=info.model_dump_json(), media_type="application/json")

    health_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "Everything is working fine"},
        503: {"model": ErrorResponse, "description": "Text generation inference is down"},
    }

    async def health() -> Response:
        if await infer.health():
            return Response(status_code=200)
        return JSONResponse(
            status_code=503, content={"error": "unhealthy", "error_type": "healthcheck"}
        )

    open_routes.add_api_route(
        "/health",
        health,
        methods=["GET"],
        responses=health_responses,
        summary="Health check method",
    )
    for path in ("/", "/ping"):
        open_routes.add_api_route(
            path, health, methods=["GET"], include_in_schema=False, name=f"health{path}"
        )
    return generation, open_routes
