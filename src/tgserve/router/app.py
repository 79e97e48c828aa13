"""Route wiring of the router's FastAPI app, with CORS, API key, payload limit, docs and metrics."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from tgserve import __version__
from tgserve.router import contract
from tgserve.router.chat import ChatTemplate, load_chat_template
from tgserve.router.errors import install_error_handlers
from tgserve.router.infer import Infer
from tgserve.router.metrics import exposition
from tgserve.router.middleware import ApiKeyMiddleware, PayloadLimitMiddleware
from tgserve.router.native import routes as native
from tgserve.router.openai import routes as openai
from tgserve.router.request_id import RequestIdMiddleware
from tgserve.router.settings import RouterSettings

# POST routes that need the API key (TGI's "base" routes); later routes join this set.
PROTECTED_POST_PATHS = frozenset(
    {
        "/",
        "/generate",
        "/generate_stream",
        "/tokenize",
        "/chat_tokenize",
        "/v1/chat/completions",
        "/v1/completions",
        "/invocations",
        "/vertex",
    }
)


async def metrics() -> Response:
    return Response(content=exposition(), media_type=CONTENT_TYPE_LATEST)


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
    template = chat_template or load_chat_template(None, infer.tokenizer.tokenizer)
    app.state.native = native.NativeContext.create(infer, settings, info)
    app.state.openai = openai.OpenAIContext.create(infer, settings, template)
    contract.install(
        app,
        app.state.openai.caps,
        infer.tokenizer.tokenizer,
        PROTECTED_POST_PATHS if settings.api_key else None,
    )
    app.include_router(native.generation_routes)
    app.include_router(native.open_routes)
    app.include_router(openai.generation_routes)
    app.include_router(openai.open_routes)
    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        summary="Prometheus metrics scrape endpoint",
        tags=["Text Generation Inference"],
        response_class=Response,
    )

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
