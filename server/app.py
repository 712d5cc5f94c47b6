"""The FastAPI app factory: `create_app(settings)`; `lifespan` loads the model and starts the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server.bodylimit import RequestGuard
from server.errors import install_handlers
from server.openapi import install_openapi
from server.routes import openai, ops, playground, sessions
from server.runtime import start_runtime
from server.settings import Settings

log = logging.getLogger(__name__)


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
    app.add_middleware(RequestGuard, settings=settings)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(sessions.router)
    if settings.playground:  # GET / and /static/*: the web playground (404 when off)
        app.include_router(playground.router)
    install_openapi(app, settings)
    return app
