"""What Client and AsyncClient share: configuration, the request each method sends, retry delays.

Each public method is a `Call` (built here once) sent by the sync or the async transport.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar
from urllib.parse import quote

import httpx

from retserve_client.errors import APIConnectionError, APITimeoutError, RetserveError, stream_error
from retserve_client.sse import DONE
from retserve_client.types import Chunk, Completion, Model, Session, SessionPage, SessionStats

T = TypeVar("T")
DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)
StreamKind = Literal["completion", "chat"]
RetryHook = Callable[[int, float, RetserveError], None]  # (attempt number from 1, delay s, the error)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request of the API and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    content: bytes | None = None
    params: dict[str, Any] | None = None
    idempotent: bool = False  # retried on 429/503 by default (GET, DELETE, PUT state)
    stream: bool = False


def sid(session_id: str) -> str:
    """A session id as a path segment (the server's ids never need escaping; odd input gets a 4xx)."""
    if not isinstance(session_id, str) or not session_id:
        raise ValueError(f"session_id must be a non-empty string, got {session_id!r}")
    return quote(session_id, safe="")


def _json(resp: httpx.Response) -> Any:
    return resp.json()


def _session(resp: httpx.Response) -> Session:
    return Session.from_json(resp.json())


def _completion(resp: httpx.Response) -> Completion:
    return Completion.from_json(resp.json())


def _models(resp: httpx.Response) -> list[Model]:
    return [Model.from_json(m) for m in resp.json().get("data", [])]


def _stats(resp: httpx.Response) -> SessionStats:
    return SessionStats.from_json(resp.json())


def _page(resp: httpx.Response) -> SessionPage:
    return SessionPage.from_json(resp.json())


def _deleted(resp: httpx.Response) -> bool:
    return bool(resp.json().get("deleted", True))


def _bytes(resp: httpx.Response) -> bytes:
    return resp.content


def _body(fields: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON body: the named fields that are not None, and every extra param as given."""
    clash = sorted(set(fields) & set(params))
    if clash:
        raise TypeError(f"{', '.join(clash)} given twice (as an argument and in **params)")
    return {**{k: v for k, v in fields.items() if v is not None}, **params}


def read_state_arg(data_or_path: bytes | bytearray | memoryview | str | os.PathLike[str]) -> bytes:
    """The blob to import: bytes as given, or the contents of a file path."""
    if isinstance(data_or_path, bytes | bytearray | memoryview):
        return bytes(data_or_path)
    if isinstance(data_or_path, str | os.PathLike):
        return Path(data_or_path).read_bytes()
    raise TypeError(f"import_state wants bytes or a file path, got {type(data_or_path).__name__}")


class Calls:
    """The request of every API method (shared by both clients)."""

    @staticmethod
    def completions(prompt: str | Sequence[int], stream: bool, params: dict[str, Any]) -> Call[Any]:
        body = _body({"prompt": prompt if isinstance(prompt, str) else list(prompt)}, params)
        return Call("POST", "/v1/completions", _completion, json={**body, "stream": stream}, stream=stream)

    @staticmethod
    def chat(messages: Sequence[Mapping[str, Any]], stream: bool, params: dict[str, Any]) -> Call[Any]:
        body = _body({"messages": [dict(m) for m in messages]}, params)
        path = "/v1/chat/completions"
        return Call("POST", path, _completion, json={**body, "stream": stream}, stream=stream)

    @staticmethod
    def create_session(
        session_id: str | None, prompt: str | Sequence[int] | None, token_dropping: dict | None
    ) -> Call[Session]:
        if prompt is not None and not isinstance(prompt, str):
            prompt = list(prompt)
        body = _body({"session_id": session_id, "prompt": prompt, "token_dropping": token_dropping}, {})
        return Call("POST", "/v1/sessions", _session, json=body)

    @staticmethod
    def prime(session_id: str, prompt: str | Sequence[int], token_dropping: dict | None) -> Call[Session]:
        body = _body({"prompt": prompt if isinstance(prompt, str) else list(prompt)}, {})
        if token_dropping is not None:
            body["token_dropping"] = token_dropping
        return Call("POST", f"/v1/sessions/{sid(session_id)}/prime", _session, json=body)

    @staticmethod
    def generate(
        session_id: str, prompt: str | Sequence[int], stream: bool, params: dict[str, Any]
    ) -> Call[Any]:
        body = _body({"prompt": prompt if isinstance(prompt, str) else list(prompt)}, params)
        path = f"/v1/sessions/{sid(session_id)}/generate"
        return Call("POST", path, _completion, json={**body, "stream": stream}, stream=stream)

    @staticmethod
    def fork(session_id: str, new_id: str | None) -> Call[Session]:
        body = {"session_id": new_id} if new_id is not None else {}
        return Call("POST", f"/v1/sessions/{sid(session_id)}/fork", _session, json=body)

    @staticmethod
    def merge(
        sources: Sequence[str], mode: str, weights: Sequence[float] | None, session_id: str | None
    ) -> Call[Session]:
        if isinstance(sources, str):
            raise TypeError("sources must be a list of session ids, not one string")
        fields = {
            "sources": list(sources),
            "mode": mode,
            "weights": None if weights is None else list(weights),
            "session_id": session_id,
        }
        return Call("POST", "/v1/sessions/merge", _session, json=_body(fields, {}))

    @staticmethod
    def get_session(session_id: str) -> Call[Session]:
        return Call("GET", f"/v1/sessions/{sid(session_id)}", _session, idempotent=True)

    @staticmethod
    def session_stats(session_id: str) -> Call[SessionStats]:
        return Call("GET", f"/v1/sessions/{sid(session_id)}/stats", _stats, idempotent=True)

    @staticmethod
    def list_page(limit: int, cursor: str | None) -> Call[SessionPage]:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        return Call("GET", "/v1/sessions", _page, params=params, idempotent=True)

    @staticmethod
    def delete_session(session_id: str) -> Call[bool]:
        return Call("DELETE", f"/v1/sessions/{sid(session_id)}", _deleted, idempotent=True)

    @staticmethod
    def export_state(session_id: str) -> Call[bytes]:
        return Call("GET", f"/v1/sessions/{sid(session_id)}/state", _bytes, idempotent=True)

    @staticmethod
    def import_state(session_id: str, data: bytes) -> Call[Session]:
        path = f"/v1/sessions/{sid(session_id)}/state"
        return Call("PUT", path, _session, content=data, idempotent=True)

    @staticmethod
    def health() -> Call[dict]:
        return Call("GET", "/health", _json, idempotent=True)

    @staticmethod
    def models() -> Call[list[Model]]:
        return Call("GET", "/v1/models", _models, idempotent=True)


class Config:
    """Connection settings shared by Client and AsyncClient.

    base_url: argument, else RETSERVE_URL, else http://127.0.0.1:8000. api_key: argument, else
    RETSERVE_API_KEY, else none (a server without keys). max_retries: how many times a 429/503 (or a
    failed connection) is retried, waiting at least the server's Retry-After, else an exponential backoff
    from `backoff_s` (capped at `max_backoff_s`; a Retry-After longer than that is raised, not waited).
    Only idempotent calls (GET, DELETE, PUT state) are retried unless `retry_non_idempotent=True` (a
    retried POST may run twice if the first attempt's answer was lost). `on_retry(attempt, delay_s,
    error)` is called before each wait.
    """

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        retry_non_idempotent: bool,
        backoff_s: float,
        max_backoff_s: float,
        on_retry: RetryHook | None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_s < 0 or max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")
        url = base_url or os.environ.get("RETSERVE_URL") or DEFAULT_URL
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {url!r}")
        self.base_url = url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("RETSERVE_API_KEY") or None
        self.timeout = timeout
        self.max_retries = max_retries
        self.retry_non_idempotent = retry_non_idempotent
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.on_retry = on_retry

    def headers(self) -> dict[str, str]:
        h = {"User-Agent": "retserve-client/0.1"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def may_retry(self, call: Call[Any], attempt: int) -> bool:
        return attempt < self.max_retries and (call.idempotent or self.retry_non_idempotent)

    def retry_delay(self, attempt: int, err: RetserveError) -> float | None:
        """Seconds to wait before retry number `attempt + 1`: at least the server's Retry-After; None
        (do not retry: raise, the error carries `retry_after`) when that is over `max_backoff_s`."""
        if err.retry_after is not None and err.retry_after > self.max_backoff_s:
            return None
        backoff = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)
        return max(backoff, err.retry_after or 0.0)


def retryable(err: RetserveError) -> bool:
    """429 / 503, or a connection that failed (not a timeout: the server may still be working on it)."""
    if isinstance(err, APITimeoutError):
        return False
    return err.status in RETRY_STATUSES or isinstance(err, APIConnectionError)


def transport_error(e: httpx.TransportError, call: Call[Any]) -> RetserveError:
    what = f"{call.method} {call.path}"
    if isinstance(e, httpx.TimeoutException):
        return APITimeoutError(f"{what} timed out ({type(e).__name__}); raise `timeout` or retry")
    return APIConnectionError(f"{what} failed: {type(e).__name__}: {e}")


def decode_event(data: str) -> Chunk | None:
    """The chunk an SSE event carries; None for [DONE]; raises the error an error event carries."""
    if data == DONE:
        return None
    err = stream_error(data)
    if err is not None:
        raise err
    return Chunk.from_json(json.loads(data))


def truncated_stream(call: Call[Any]) -> APIConnectionError:
    return APIConnectionError(f"{call.method} {call.path}: the stream ended before [DONE]")
