"""HTTP plumbing both APIs share: the API key and payload limit middlewares, client disconnects."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable
from typing import TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tgserve.router.errors import PayloadTooLargeError, error_info

T = TypeVar("T")

CLIENT_CLOSED_REQUEST = 499  # nginx's code; nobody reads it, but logs should not say 200
_DISCONNECT_POLL_S = 0.05
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
                # TGI answers an empty body; clients and the OpenAPI document want the error shape.
                body = {"error": "Unauthorized: a valid `Authorization: Bearer <key>` header is "
                        "required", "error_type": "authentication"}
                answer = JSONResponse(
                    status_code=401, content=body, headers={"www-authenticate": "Bearer"}
                )
                await answer(scope, receive, send)
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
