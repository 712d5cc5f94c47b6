"""`retserve-server` / `python -m server`: run the app with uvicorn (settings from RETSERVE_* env vars)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from pydantic_settings import SettingsError

from server.app import create_app
from server.runtime import StartupError, preflight
from server.settings import Settings


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="Serve a RetNet model (settings: RETSERVE_* env vars, see README)"
    )
    ap.add_argument("--host", help="overrides RETSERVE_HOST")
    ap.add_argument("--port", type=int, help="overrides RETSERVE_PORT")
    ap.add_argument("--model-path", help="overrides RETSERVE_MODEL_PATH")
    ap.add_argument("--store-url", help="overrides RETSERVE_STORE_URL")
    args = ap.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    try:
        settings = Settings(**overrides)
    except (ValidationError, SettingsError) as e:
        sys.exit(f"retserve: invalid settings (RETSERVE_* environment variables):\n{e}")
    try:
        preflight(settings)
    except StartupError as e:
        sys.exit(f"retserve: {e}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=round(settings.shutdown_timeout_s) + 10,  # a backstop, see below
    )
    try:
        GracefulServer(config, app, settings.shutdown_timeout_s).run()
    except StartupError as e:
        sys.exit(f"retserve: {e}")


class GracefulServer(uvicorn.Server):
    """On SIGTERM: stop accepting, let running requests go on for `grace` seconds, then stop the
    engine, which ends every request as an abort: streams get an error event and `[DONE]`, and each
    session is saved with exactly the tokens delivered (rather than uvicorn cutting connections)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace: float) -> None:
        super().__init__(config)
        self.retserve_app = app
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        rt = getattr(self.retserve_app.state, "runtime", None)
        stopper = None
        if rt is not None:

            async def stop_engine() -> None:
                await asyncio.sleep(self.grace)
                await asyncio.to_thread(rt.engine.shutdown)

            stopper = asyncio.get_running_loop().create_task(stop_engine())
        try:
            await super().shutdown(sockets)
        finally:
            if stopper is not None:
                stopper.cancel()


if __name__ == "__main__":
    main()
