"""Route wiring of the router's FastAPI app, with CORS, API key, payload limit, docs and metrics."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tgserve import __version__
from tgserve.router.chat import ChatTemplate, load_chat_template
from tgserve.router.errors import PayloadTooLargeError, error_info, install_error_handlers
from tgserve.router.infer import Infer
from tgserve.router.metrics import exposition
from tgserve.router.native.routes import native_router
from tgserve.router.native.schemas import Info
from tgserve.router.openai.routes import openai_router
from tgserve.router.request_id import RequestIdMiddleware
from tgserve.router.settings import RouterSettings

# POST routes that need the API key (TGI's "base" routes); later routes join this set.
PROTECTED_POST_PATHS = frozenset(
    {
        "/",
        "/generate",
        "/generate_stream",
        "/tokenize",
        "/v1/chat/completions",
        "/v1/completions",
        "/invocations",
        "/vertex",
    }
)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class ApiKeyMiddleware:
    """`Authorization: Bearer <key>` compared case-insensitively, before the body is read."""

    def __init__(self, app: ASGIApp, api_key: str, protected: frozenset[str]) -> None:
        self.app = app
        self.expected = f"bearer {api_key}".lower().encode("utf-8")
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"] in self.protected
        ):
            given = dict(scope["headers"]).get(b"authorization", b"")
            given = given.decode("utf-8", "replace").lower().encode("utf-8")
            if not hmac.compare_digest(given, self.expected):
                await Response(status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class PayloadLimitMiddleware:
    """Answers 413 for bodies over the limit, whether or not Content-Length announces them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        info = error_info(PayloadTooLargeError(self.limit))
        await JSONResponse(status_code=info.status, content=info.body())(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        announced = dict(scope["headers"]).get(b"content-length", b"")
        if announced.isdigit() and int(announced) > self.limit:
            await self._reject(scope, receive, send)
            return
        # Buffer the body (at most `limit` bytes), then replay it to the app in one message.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending it all
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


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


def create_app(
    infer: Infer,
    info: dict[str, Any],
    settings: RouterSettings,
    chat_template: ChatTemplate | None = None,
) -> FastAPI:
    """`chat_template` None: the tokenizer's own, if it has one."""
    app = FastAPI(
        title="Text Generation Inference",
        description="Text Generation Webserver",
        version=__version__,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/api-doc/openapi.json",
        # A body without Content-Type is read as JSON (curl -d); TGI answers 415 there.
        strict_content_type=False,
        license_info={"name": "Apache 2.0", "url": "https://www.apache.org/licenses/LICENSE-2.0"},
    )
    install_error_handlers(app)
    generation, open_routes = native_router(
        infer, build_info(settings, info), settings.compute_type
    )
    app.include_router(generation)
    app.include_router(open_routes)
    template = chat_template or load_chat_template(None, infer.tokenizer.tokenizer)
    for router in openai_router(infer, settings, template):
        app.include_router(router)

    @app.get(
        "/metrics",
        summary="Prometheus metrics scrape endpoint",
        tags=["Text Generation Inference"],
        response_class=Response,
    )
    async def metrics() -> Response:
        return Response(content=exposition(), media_type=CONTENT_TYPE_LATEST)

    # Added innermost first: CORS ends up outermost so that even 401/413 answers carry its headers.
    app.add_middleware(PayloadLimitMiddleware, limit=settings.payload_limit)
    if settings.api_key:
        app.add_middleware(
            ApiKeyMiddleware, api_key=settings.api_key, protected=PROTECTED_POST_PATHS
        )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.cors_allow_origin) or ["*"],
        allow_methods=["GET", "POST"],
        # TGI allows only content-type; authorization too, so browsers can send the API key.
        allow_headers=["content-type", "authorization"],
        expose_headers=["x-request-id"],
    )
    # Outermost: every answer, 401/413/CORS preflight included, carries the request id.
    app.add_middleware(RequestIdMiddleware)
    return app
