"""Typed errors, from the server's OpenAI error objects: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import email.utils
import json
import time

import httpx


class RetserveError(Exception):
    """Base of every error this client raises.

    `status` is the HTTP status (None for transport errors and for errors that arrive inside a stream
    without one); `code`, `param` and `type` are the server's error object fields.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.param = param
        self.type = type
        self.retry_after = retry_after  # seconds, from Retry-After (429 / 503)

    def __str__(self) -> str:
        where = f" [{self.status}]" if self.status is not None else ""
        extra = ", ".join(f"{k}={v}" for k, v in (("code", self.code), ("param", self.param)) if v)
        return f"{self.message}{where}" + (f" ({extra})" if extra else "")


class BadRequest(RetserveError):
    """400 (also 405, 415, 422): the request is wrong; `message` says what to fix, `param` which field."""


class AuthenticationError(RetserveError):
    """401: missing or unknown API key (pass `api_key=` or set RETSERVE_API_KEY)."""


class NotFound(RetserveError):
    """404: no such session in your tenant (or no such model / path)."""


class SessionBusy(RetserveError):
    """409: the session is in use by another request, or the session id you asked for exists."""


Conflict = SessionBusy


class PayloadTooLarge(RetserveError):
    """413: the body is over the server's limit (RETSERVE_MAX_BODY_BYTES / RETSERVE_MAX_STATE_BYTES)."""


class RateLimited(RetserveError):
    """429: over the rate limit; `retry_after` is the seconds the server asked to wait."""


class Unavailable(RetserveError):
    """503: the server is starting, shutting down or overloaded; `retry_after` when it said."""


class ServerError(RetserveError):
    """Another 5xx (e.g. 500 `engine_error`: the session was not changed; retry)."""


class APIConnectionError(RetserveError):
    """The server could not be reached, or the connection broke (no HTTP status)."""


class APITimeoutError(APIConnectionError):
    """The request took longer than the client's `timeout`."""


BY_STATUS: dict[int, type[RetserveError]] = {
    400: BadRequest,
    405: BadRequest,
    415: BadRequest,
    422: BadRequest,
    401: AuthenticationError,
    404: NotFound,
    409: SessionBusy,
    413: PayloadTooLarge,
    429: RateLimited,
    503: Unavailable,
}
# error objects inside a stream carry no status: their `type` says which error it is
BY_TYPE: dict[str, tuple[int, type[RetserveError]]] = {
    "authentication_error": (401, AuthenticationError),
    "not_found_error": (404, NotFound),
    "conflict_error": (409, SessionBusy),
    "rate_limit_error": (429, RateLimited),
    "service_unavailable_error": (503, Unavailable),
    "server_error": (500, ServerError),
    "invalid_request_error": (400, BadRequest),
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_class(status: int) -> type[RetserveError]:
    if status in BY_STATUS:
        return BY_STATUS[status]
    return ServerError if status >= 500 else RetserveError


def from_response(resp: httpx.Response) -> RetserveError:
    """The typed error for a non-2xx response (its body must have been read)."""
    message, code, param, kind = f"HTTP {resp.status_code}", None, None, None
    try:
        detail = resp.json().get("error")
    except (ValueError, AttributeError):
        detail = None
    if isinstance(detail, dict):
        message = str(detail.get("message") or message)
        code, param, kind = detail.get("code"), detail.get("param"), detail.get("type")
    elif resp.text:
        message = f"HTTP {resp.status_code}: {resp.text[:500]}"
    cls = error_class(resp.status_code)
    retry_after = parse_retry_after(resp.headers.get("retry-after"))
    return cls(message, status=resp.status_code, code=code, param=param, type=kind, retry_after=retry_after)


def from_stream_event(detail: dict) -> RetserveError:
    """The typed error for an error object sent inside a stream (`data: {"error": {...}}`)."""
    kind = detail.get("type")
    status, cls = BY_TYPE.get(str(kind), (None, RetserveError))
    return cls(
        str(detail.get("message") or "error in stream"),
        status=status,
        code=detail.get("code"),
        param=detail.get("param"),
        type=kind,
    )


def stream_error(data: str) -> RetserveError | None:
    """The error an SSE data payload carries, if it is an error object."""
    try:
        obj = json.loads(data)
    except ValueError:
        return RetserveError(f"the server sent an event that is not JSON: {data[:200]!r}")
    if isinstance(obj, dict) and isinstance(obj.get("error"), dict):
        return from_stream_event(obj["error"])
    return None
