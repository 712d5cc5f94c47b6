"""The request guard (pure ASGI middleware): whatever can be refused before a request body is read is
refused before it is read, so a body nobody will use never costs memory.

A wrong method is a 405 whose Allow lists every method of the path (FastAPI's lists one route's).
For a request that carries a body (a Content-Length above 0, or chunked), in this order:

1. route it: an unknown path is a 404, a wrong method the 405;
2. authenticate it, if its route needs a tenant and keys are configured: 401; then the caller's rate
   limit is peeked (not spent: the tenant dependency spends it): 429 + Retry-After;
3. a state upload (`PUT /v1/sessions/{id}/state`) takes one of `max_state_uploads` slots (503 +
   Retry-After when none is free), is refused over `max_state_bytes` (413; a declared length before
   reading), and is spooled while it arrives (memory up to `SPOOL_MEMORY_BYTES`, then a temporary
   file), then handed to the route in one piece;
4. a JSON route wants `Content-Type: application/json` (415) and at most `max_body_bytes` (413).

A refused body is never read: uvicorn discards what the client still sends after the answer.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.auth import ANONYMOUS, match_key, rate_limited
from server.deps import get_tenant
from server.errors import APIError, send_error
from server.settings import Settings

SPOOL_MEMORY_BYTES = 1 << 20  # a state upload is held in memory up to this, then in a temporary file
STATE_UPLOADS = {("PUT", "/v1/sessions/{session_id}/state")}  # (method, path template): raw byte bodies


@dataclass(frozen=True)
class RouteKind:
    needs_tenant: bool  # the route depends on get_tenant (API key + rate limit)
    json_body: bool  # the route reads a JSON body model
    state_upload: bool  # the route reads raw state bytes


def depends_on(dependant: Dependant, call: Callable) -> bool:
    return any(d.call is call or depends_on(d, call) for d in dependant.dependencies)


def route_kind(route: BaseRoute) -> RouteKind:
    if not isinstance(route, APIRoute):
        return RouteKind(False, False, False)
    state = any((m, route.path_format) in STATE_UPLOADS for m in route.methods)
    return RouteKind(depends_on(route.dependant, get_tenant), route.body_field is not None, state)


def flat_routes(routes: list[BaseRoute]) -> Iterator[tuple[BaseRoute, BaseRoute]]:
    """(matcher, route) for every route: newer FastAPI nests each included router in one entry whose
    `effective_route_contexts()` match with the include's prefix; older ones list the routes flat."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if contexts is None:
            yield route, route
        else:
            for ctx in contexts():
                yield ctx, getattr(ctx, "original_route", ctx)


def match_route(app: Starlette, scope: Scope) -> BaseRoute:
    """The route that will serve `scope`; 404 / 405 (with Allow) if none."""
    allowed: set[str] = set()
    for matcher, route in flat_routes(app.router.routes):
        match, _ = matcher.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL:
            allowed |= getattr(matcher, "methods", None) or set()
    if allowed:
        allow = ", ".join(sorted(allowed))
        raise APIError(
            405,
            f"{scope['method']} is not allowed on {scope['path']}; allowed: {allow}",
            code="method_not_allowed",
            headers={"Allow": allow},
        )
    raise APIError(404, f"no endpoint at {scope['path']} (the README lists them)", code="not_found")


def declared_length(headers: Headers) -> tuple[int | None, bool]:
    """(Content-Length or None, chunked?); 400 for a Content-Length that is not a number."""
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    raw = headers.get("content-length")
    if raw is None or chunked:
        return None, chunked
    if not raw.strip().isdigit():
        raise APIError(400, f"Content-Length {raw[:40]!r} is not a number of bytes")
    return int(raw), False


def check_json_type(headers: Headers) -> None:
    ctype = headers.get("content-type", "")
    mime = ctype.split(";")[0].strip().lower()
    if mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json")):
        return
    got = f"Content-Type {ctype[:80]!r}" if ctype else "no Content-Type"
    raise APIError(
        415,
        f"this endpoint reads a JSON body: send it with 'Content-Type: application/json' (got {got})",
        code="unsupported_media_type",
    )


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that gives the app `body` in one message, then the client's further messages."""
    sent = False

    async def _receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return _receive


async def read_bounded(receive: Receive, limit: int, too_big: Callable[[], APIError]) -> bytes | None:
    """The whole body (spooled: memory up to SPOOL_MEMORY_BYTES, then a temporary file) or None if the
    client went away; `too_big()` is raised as soon as it passes `limit` bytes."""
    size = 0
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as spool:
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_big()
            spool.write(chunk)
            if not msg.get("more_body", False):
                break
        spool.seek(0)
        return spool.read()


class RequestGuard:
    """See the module docstring. One instance per app; `uploads` counts state uploads in flight."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.uploads = 0  # touched only on the event loop: no lock needed
        self._kinds: dict[int, RouteKind] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        app: Starlette = scope["app"]
        try:
            length, chunked = declared_length(headers)
            has_body = chunked or bool(length)
            route = self._route(app, scope, has_body)
            if route is None or not has_body:  # nothing to guard
                kind = None
            else:
                kind = self._kinds.get(id(route)) or self._kinds.setdefault(id(route), route_kind(route))
                if kind.needs_tenant and get_tenant not in app.dependency_overrides:
                    self._authenticate(app, headers)
                if kind.state_upload:
                    self._check_upload(length)
                elif kind.json_body:
                    check_json_type(headers)
        except APIError as err:
            return await send_error(scope, receive, send, err)
        if kind is None:
            return await self.app(scope, receive, send)
        if kind.state_upload:
            return await self._state_upload(scope, receive, send)
        return await self._bounded(scope, receive, send, length)

    @staticmethod
    def _route(app: Starlette, scope: Scope, has_body: bool) -> BaseRoute | None:
        """The matching route; None where the app's router answers itself (no body and no route: a
        404 or a trailing-slash redirect). A wrong method is a 405 listing every allowed method."""
        try:
            return match_route(app, scope)
        except APIError as err:
            if err.status == 404 and not has_body:
                return None
            raise

    def _authenticate(self, app: Starlette, headers: Headers) -> None:
        rt = getattr(app.state, "runtime", None)
        if rt is None:  # starting up: the route's dependency answers 503
            return
        keys = self.settings.api_keys
        bucket = match_key(keys, headers.get("authorization", "")) if keys else ANONYMOUS
        wait = rt.limiter.peek(bucket)
        if wait > 0:
            raise rate_limited(rt.limiter, wait)

    def _check_upload(self, length: int | None) -> None:
        """413 for a declared length over the limit, 503 when every upload slot is taken."""
        limit = self.settings.max_state_bytes
        if length is not None and length > limit:
            raise APIError(413, f"the state blob of {length} bytes exceeds {self._state_limit()}")
        if self.uploads >= self.settings.max_state_uploads:
            raise APIError(
                503,
                f"{self.uploads} state uploads are in progress, the limit of this server"
                " (RETSERVE_MAX_STATE_UPLOADS); retry shortly",
                code="too_many_uploads",
                headers={"Retry-After": "1"},
            )

    def _state_limit(self) -> str:
        return f"the limit of {self.settings.max_state_bytes} bytes (RETSERVE_MAX_STATE_BYTES)"

    async def _state_upload(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.uploads += 1
        try:
            try:
                body = await read_bounded(
                    receive,
                    self.settings.max_state_bytes,
                    lambda: APIError(413, f"the state blob exceeds {self._state_limit()}"),
                )
            except APIError as err:
                return await send_error(scope, receive, send, err)
            if body is not None:
                await self.app(scope, replay(body, receive), send)
        finally:
            self.uploads -= 1

    async def _bounded(self, scope: Scope, receive: Receive, send: Send, length: int | None) -> None:
        """Any other body: at most max_body_bytes (a chunked one is read here, bounded, then replayed)."""
        limit = self.settings.max_body_bytes
        setting = f"the limit of {limit} bytes (RETSERVE_MAX_BODY_BYTES)"
        if length is not None:
            if length > limit:
                err = APIError(413, f"the request body of {length} bytes exceeds {setting}")
                return await send_error(scope, receive, send, err)
            return await self.app(scope, receive, send)
        try:
            body = await read_bounded(
                receive, limit, lambda: APIError(413, f"the request body exceeds {setting}")
            )
        except APIError as err:
            return await send_error(scope, receive, send, err)
        if body is not None:
            await self.app(scope, replay(body, receive), send)
