"""The router's phases as clients see them: 503 while warming up or draining, in between serving.

The HTTP port opens before warmup, so that a probe can tell "warming up" from "dead", and it
stays open while draining after SIGTERM, so that a new request gets a 503 with Retry-After (a
load balancer retries elsewhere) instead of a refused connection. This is the outermost ASGI
app: it also counts the requests in flight that draining waits for.
"""

from __future__ import annotations

import json
from enum import Enum

from starlette.types import ASGIApp, Receive, Scope, Send

# Seconds a client is told to wait while this server cannot serve: it never gets better within
# a drain, and a warmup takes tens of seconds; a retry elsewhere is what helps.
RETRY_AFTER_S = 5
READY_PATH = "/ready"


class Phase(Enum):
    WARMING_UP = "warming_up"
    SERVING = "serving"
    DRAINING = "draining"


_MESSAGES = {
    Phase.WARMING_UP: "the server is warming up",
    Phase.DRAINING: "the server is shutting down",
}


def not_ready_body(reason: str, message: str) -> dict[str, object]:
    """The readiness answer when not ready, in the error shape every other 503 has."""
    return {"ready": False, "reason": reason, "error": message, "error_type": "unavailable"}


class Lifecycle:
    def __init__(self) -> None:
        self.app: ASGIApp | None = None
        self.phase = Phase.WARMING_UP
        self.step = "starting"  # what warmup is doing now, for /ready
        self.in_flight = 0

    def serve(self, app: ASGIApp) -> None:
        self.app = app
        self.phase = Phase.SERVING

    def drain(self) -> None:
        self.phase = Phase.DRAINING

    @property
    def draining(self) -> bool:
        return self.phase is Phase.DRAINING

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if self.app is not None:
                await self.app(scope, receive, send)
            return
        if self.phase is not Phase.SERVING or self.app is None:
            await self._unavailable(scope, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _unavailable(self, scope: Scope, send: Send) -> None:
        message = _MESSAGES.get(self.phase, "the server is not serving")
        if self.phase is Phase.WARMING_UP:
            message = f"{message} ({self.step})"
        body: dict[str, object] = {"error": message, "error_type": "unavailable"}
        if scope["path"] == READY_PATH:
            body = not_ready_body(self.phase.value, message)
        headers = [(b"content-type", b"application/json"),
                   (b"retry-after", str(RETRY_AFTER_S).encode())]
        if self.phase is Phase.DRAINING:
            headers.append((b"connection", b"close"))  # no keep-alive into a server that leaves
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})
