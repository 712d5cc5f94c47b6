"""The web playground: GET / is the page, GET /static/{name} its files (server/static: plain HTML, JS
and CSS shipped in the package; no build step, nothing loaded from elsewhere, works offline).

The page talks to the API like any client (Bearer key from the browser's session storage). It is
served only with RETSERVE_PLAYGROUND=true (the default): app.py leaves this router out otherwise, so
both paths are a 404. Every response carries a strict Content-Security-Policy: the page may load
only its own files and talk only to this server.
"""

from __future__ import annotations

import functools
from pathlib import Path

from fastapi import APIRouter, Response

from server.errors import APIError

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@functools.cache
def static_files() -> dict[str, Path]:
    """The files the playground may serve, by name (only these: no path ever reaches the disk); none
    if the package was installed without its static files."""
    if not STATIC_DIR.is_dir():
        return {}
    return {p.name: p for p in STATIC_DIR.iterdir() if p.is_file() and p.suffix in MEDIA_TYPES}


@functools.cache
def _content(name: str) -> bytes:
    return static_files()[name].read_bytes()


def serve(name: str) -> Response:
    if name not in static_files():
        raise APIError(404, f"no playground file {name!r}", code="not_found")
    return Response(_content(name), media_type=MEDIA_TYPES[Path(name).suffix], headers=HEADERS)


@router.get("/")
async def page() -> Response:
    return serve("index.html")


@router.get("/static/{name}")
async def static(name: str) -> Response:
    return serve(name)
