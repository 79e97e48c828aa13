"""The one place where router errors become HTTP status codes, error types and messages."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from tgserve.router.types import (
    DeadlineExceededError,
    DeadlineUnreachableError,
    GenerationError,
    IncompleteGenerationError,
    InferError,
    OverloadedError,
)

logger = logging.getLogger(__name__)


class ValidationError(InferError):
    """A request broke one of the validation rules; the message carries the offending numbers."""


class IncompleteGenerationStreamError(IncompleteGenerationError):
    """The backend stream ended without its final event."""


class PayloadTooLargeError(Exception):
    """The request body is larger than --payload-limit."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body exceeds the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class ErrorInfo:
    status: int
    error_type: str
    message: str
    retry_after: float | None = None  # seconds, for a Retry-After header

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def headers(self) -> dict[str, str] | None:
        if self.retry_after is None:
            return None
        return {"retry-after": str(max(math.ceil(self.retry_after), 1))}


def error_info(exc: BaseException) -> ErrorInfo:
    """Map any exception to what the client sees; unknown ones never leak their text."""
    if isinstance(exc, ValidationError):
        return ErrorInfo(422, "validation", f"Input validation error: {exc}")
    if isinstance(exc, DeadlineUnreachableError):
        return ErrorInfo(429, "overloaded", f"Model is overloaded: {exc}", exc.retry_after)
    if isinstance(exc, OverloadedError):
        return ErrorInfo(429, "overloaded", "Model is overloaded", 1.0)
    if isinstance(exc, DeadlineExceededError):
        return ErrorInfo(503, "deadline_exceeded", f"Request deadline exceeded: {exc}",
                         exc.retry_after)
    if isinstance(exc, GenerationError):
        return ErrorInfo(424, "generation", f"Request failed during generation: {exc}")
    if isinstance(exc, PayloadTooLargeError):
        return ErrorInfo(413, "payload_too_large", f"Payload too large: {exc}")
    if isinstance(exc, IncompleteGenerationStreamError):
        return ErrorInfo(500, "incomplete_generation_stream", "Incomplete generation stream")
    if isinstance(exc, IncompleteGenerationError):
        return ErrorInfo(500, "incomplete_generation", "Incomplete generation")
    return ErrorInfo(500, "internal", "Internal server error")


def error_response(exc: BaseException) -> JSONResponse:
    info = error_info(exc)
    return JSONResponse(status_code=info.status, content=info.body(), headers=info.headers())


def _describe_input(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def request_validation_info(errors: list[dict[str, Any]]) -> ErrorInfo:
    """Turn FastAPI/pydantic body errors into one message that names each field and its problem."""
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid JSON")
            loc = err.get("loc", ())
            where = f" at character {loc[1]}" if len(loc) > 1 else ""
            message = f"Failed to parse the request body as JSON: {reason}{where}"
            return ErrorInfo(400, "validation", message)
    for err in errors:
        if not err.get("loc", ())[1:] and isinstance(err.get("input"), bytes):
            # A body FastAPI did not parse: it came with a non-JSON Content-Type (axum's 415).
            return ErrorInfo(
                415, "validation", "Expected request with `Content-Type: application/json`"
            )
    parts = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if not loc and err.get("type") == "missing":
            parts.append("the request body must be a JSON object")
            continue
        where = ".".join(loc) if loc else "body"
        msg = err.get("msg", "invalid value")
        if err.get("type") == "missing":
            parts.append(f"`{where}`: {msg}")
        else:
            parts.append(f"`{where}`: {msg}, got {_describe_input(err.get('input'))}")
    return ErrorInfo(422, "validation", "Input validation error: " + "; ".join(parts))


async def _on_infer_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)


async def _on_request_validation(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    info = request_validation_info(list(exc.errors()))
    return JSONResponse(status_code=info.status, content=info.body())


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=exc.headers)
    error_type = "validation" if exc.status_code == 400 else "http"
    return JSONResponse(
        status_code=exc.status_code,
        content={"error": str(exc.detail), "error_type": error_type},
        headers=exc.headers,
    )


async def _on_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(InferError, _on_infer_error)
    app.add_exception_handler(RequestValidationError, _on_request_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(Exception, _on_unexpected)
