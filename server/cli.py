"""`retserve-server` / `python -m server`: run the app with uvicorn (settings from RETSERVE_* env vars)."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn
from pydantic import ValidationError

from server.app import create_app
from server.runtime import StartupError
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
    except ValidationError as e:
        sys.exit(f"retserve: invalid settings:\n{e}")
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            timeout_graceful_shutdown=10,
        )
    except StartupError as e:
        sys.exit(f"retserve: {e}")


if __name__ == "__main__":
    main()
