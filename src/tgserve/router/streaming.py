"""Server-sent events: `data: <json>` framing, keep-alive comments, in-band errors, disconnects."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Mapping

import anyio
from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from tgserve.router.errors import error_info
from tgserve.router.types import InferError

logger = logging.getLogger(__name__)

KEEP_ALIVE = b": keep-alive\n\n"
KEEP_ALIVE_INTERVAL_S = 15.0  # the keep-alive period of axum's Sse, which TGI uses


def sse_data(payload: BaseModel | Mapping[str, object]) -> bytes:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.encode("utf-8") + b"\n\n"


def sse_error(exc: BaseException) -> bytes:
    if not isinstance(exc, InferError):
        logger.error("stream failed", exc_info=exc)
    return sse_data(error_info(exc).body())


async def sse_stream(responses: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    """Frame each response; any failure becomes a final in-band error event (HTTP stays 200)."""
    try:
        async for response in responses:
            yield sse_data(response)
    except Exception as exc:
        yield sse_error(exc)
    finally:
        aclose = getattr(responses, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()


class SSEResponse(Response):
    """An ASGI event-stream response that closes its source the moment the client leaves.

    Unlike Starlette's StreamingResponse it always watches for `http.disconnect` (whatever ASGI
    spec version the server speaks), so a queued request with no token yet is still cancelled,
    and it sends keep-alive comments while the source is silent.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        headers: Mapping[str, str] | None = None,
        keep_alive_s: float = KEEP_ALIVE_INTERVAL_S,
    ) -> None:
        # Response.__init__ is not called: it would render a body and a Content-Length.
        self.status_code = 200
        self.background = None
        self.events = events
        self.raw_headers = self._encode_headers(headers or {})
        self.keep_alive_s = keep_alive_s
        self.disconnected = False
        self._last_sent = time.monotonic()
        # fast_acquire: the pump's uncontended acquire (every token) does not yield to the loop.
        self._send_lock = anyio.Lock(fast_acquire=True)

    def _encode_headers(self, extra: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
        headers = {"content-type": self.media_type, "cache-control": "no-cache", **extra}
        return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def _send_body(self, send: Send, chunk: bytes, more: bool = True) -> None:
        async with self._send_lock:
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            self._last_sent = time.monotonic()

    async def _watch_disconnect(self, receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message: Message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected = True
                scope.cancel()
                return

    async def _keep_alive(self, send: Send) -> None:
        while True:
            await anyio.sleep(max(self._last_sent + self.keep_alive_s - time.monotonic(), 0.0))
            if time.monotonic() - self._last_sent >= self.keep_alive_s:
                await self._send_body(send, KEEP_ALIVE)

    async def _pump(self, send: Send) -> None:
        try:
            async for chunk in self.events:
                await self._send_body(send, chunk)
        except OSError:  # servers on ASGI spec >= 2.4 report a gone client this way
            self.disconnected = True
        finally:
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        async with anyio.create_task_group() as group:
            group.start_soon(self._watch_disconnect, receive, group.cancel_scope)
            group.start_soon(self._keep_alive, send)
            await self._pump(send)
            group.cancel_scope.cancel()
        if not self.disconnected:
            try:
                await self._send_body(send, b"", more=False)
            except OSError:
                pass
