"""The FastAPI app factory: `create_app(settings)`; `lifespan` loads the model and starts the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError, install_handlers
from server.routes import openai, ops, sessions
from server.runtime import start_runtime
from server.settings import Settings

log = logging.getLogger(__name__)


class BodyLimit:
    """413 for request bodies over `max_bytes` (pure ASGI, so streaming and disconnects pass through).

    State uploads (`PUT .../state`) are bounded by their own, larger limit in their route.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in ("POST", "PUT", "PATCH")
            or scope["path"].endswith("/state")
        ):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        n = headers.get(b"content-length")
        limit = f"the limit of {self.max_bytes} bytes (RETSERVE_MAX_BODY_BYTES)"
        if n is not None:
            if not n.isdigit() or int(n) > self.max_bytes:
                return await APIError(
                    413, f"request body of {n.decode(errors='replace')} bytes exceeds {limit}"
                ).response()(scope, receive, send)
            return await self.app(scope, receive, send)
        body = b""  # chunked: read it here, bounded, then replay it to the app
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            body += msg.get("body", b"")
            if len(body) > self.max_bytes:
                return await APIError(413, f"request body exceeds {limit}").response()(scope, receive, send)
            if not msg.get("more_body", False):
                break
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = await start_runtime(settings)
        app.state.runtime = rt
        try:
            yield
        finally:
            app.state.runtime = None
            await rt.close()

    app = FastAPI(title="retserve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.runtime = None
    install_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(sessions.router)
    return app
