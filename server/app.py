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
    """413 for request bodies over their limit: `max_state_bytes` for state uploads
    (`PUT .../state`), `max_bytes` for everything else (pure ASGI, so streaming and disconnects
    pass through)."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_state_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_state_bytes = max_state_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if scope["path"].endswith("/state"):
            max_bytes, what, setting = self.max_state_bytes, "the state blob", "RETSERVE_MAX_STATE_BYTES"
        else:
            max_bytes, what, setting = self.max_bytes, "the request body", "RETSERVE_MAX_BODY_BYTES"
        limit = f"the limit of {max_bytes} bytes ({setting})"
        n = dict(scope.get("headers") or []).get(b"content-length")
        if n is not None:
            if not n.isdigit() or int(n) > max_bytes:
                msg = f"{what} of {n.decode(errors='replace')} bytes exceeds {limit}"
                return await APIError(413, msg).response()(scope, receive, send)
            return await self.app(scope, receive, send)
        parts, size = [], 0  # chunked: read it here, bounded, then replay it to the app
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            parts.append(msg.get("body", b""))
            size += len(parts[-1])
            if size > max_bytes:
                return await APIError(413, f"{what} exceeds {limit}").response()(scope, receive, send)
            if not msg.get("more_body", False):
                break
        body = b"".join(parts)
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
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, max_state_bytes=settings.max_state_bytes)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(sessions.router)
    return app
