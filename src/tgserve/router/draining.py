"""Graceful shutdown: count requests in flight, and answer 503 to new ones once draining."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

_UNAVAILABLE = json.dumps(
    {"error": "the server is shutting down", "error_type": "unavailable"}
).encode()


class DrainMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.draining = False
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": _UNAVAILABLE})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
