"""The FastAPI app factory: `create_app(settings)`; `lifespan` loads the model and starts the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.responses import Response

from server.errors import APIError, install_handlers
from server.routes import openai, ops, sessions
from server.runtime import start_runtime
from server.settings import Settings

log = logging.getLogger(__name__)


class BodyLimit(BaseHTTPMiddleware):
    """413 for JSON bodies over `max_body_bytes` (state uploads have their own, larger limit)."""

    def __init__(self, app, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if request.method in ("POST", "PUT", "PATCH") and not request.url.path.endswith("/state"):
            n = request.headers.get("content-length")
            if n is not None and (not n.isdigit() or int(n) > self.max_bytes):
                limit = f"the limit of {self.max_bytes} (RETSERVE_MAX_BODY_BYTES)"
                return APIError(413, f"request body of {n} bytes exceeds {limit}").response()
            if n is None:  # chunked: read it here, bounded
                body = b""
                async for part in request.stream():
                    body += part
                    if len(body) > self.max_bytes:
                        return APIError(
                            413, f"request body exceeds the limit of {self.max_bytes} bytes"
                        ).response()
                request._body = body  # starlette reuses it for the endpoint
        return await call_next(request)


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
