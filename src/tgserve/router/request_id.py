"""X-Request-Id: echoed or generated for every HTTP request, and stamped on its log lines."""

from __future__ import annotations

import logging
import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
# A client's id is kept only if it is short printable ASCII: it goes into headers and logs.
_VALID_ID = re.compile(rb"[\x21-\x7e]{1,128}")


@dataclass(frozen=True)
class RequestContext:
    """What the HTTP layer knows about the request being served, for logs and traces below it."""

    request_id: str
    method: str = ""
    path: str = ""
    traceparent: str | None = None
    tracestate: str | None = None


_current: ContextVar[RequestContext | None] = ContextVar("tgserve_request", default=None)


def current() -> RequestContext | None:
    return _current.get()


def current_request_id() -> str | None:
    ctx = _current.get()
    return ctx.request_id if ctx is not None else None


def new_request_id() -> str:
    return uuid.uuid4().hex


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def request_context(scope: Scope) -> RequestContext:
    headers = list(scope.get("headers", []))
    given = _header(headers, HEADER)
    request_id = given.decode("ascii") if given and _VALID_ID.fullmatch(given) else new_request_id()
    traceparent = _header(headers, b"traceparent")
    tracestate = _header(headers, b"tracestate")
    return RequestContext(
        request_id=request_id,
        method=scope.get("method", ""),
        path=scope.get("path", ""),
        traceparent=traceparent.decode("latin-1") if traceparent else None,
        tracestate=tracestate.decode("latin-1") if tracestate else None,
    )


class RequestIdMiddleware:
    """Outermost ASGI layer: sets the request's context and adds `x-request-id` to its answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = request_context(scope)
        value = ctx.request_id.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, value)]}
            await send(message)

        token = _current.set(ctx)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to every record logged while a request is being served."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            request_id = current_request_id()
            if request_id is not None:
                record.request_id = request_id
        return True
