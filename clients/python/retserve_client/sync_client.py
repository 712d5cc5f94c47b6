"""The synchronous client."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

import httpx

from retserve_client.base import (
    Call,
    Calls,
    Config,
    RetryHook,
    decode_event,
    read_state_arg,
    retryable,
    transport_error,
    truncated_stream,
)
from retserve_client.errors import RetserveError, from_response
from retserve_client.sse import SSEParser
from retserve_client.types import Chunk, Completion, Model, Session, SessionPage, SessionStats

T = TypeVar("T")


class Stream:
    """The chunks of a streamed response (already opened: HTTP errors were raised by the call).

    Iterate it once; close it (or use `with`) to stop early, which ends the request on the server (a
    session keeps exactly the tokens delivered).

    >>> with client.completions("Hi", stream=True, max_tokens=8) as s:
    ...     for chunk in s:
    ...         print(chunk.text, end="")
    """

    def __init__(self, resp: httpx.Response, call: Call[Any]) -> None:
        self._resp = resp
        self._call = call
        self._consumed = False

    def __iter__(self) -> Iterator[Chunk]:
        if self._consumed:
            raise RetserveError("this stream was already iterated (or closed): make the call again")
        self._consumed = True
        parser = SSEParser()
        try:
            for line in self._resp.iter_lines():
                data = parser.feed(line)
                if data is None:
                    continue
                chunk = decode_event(data)
                if chunk is None:
                    return
                yield chunk
            data = parser.flush()
            if data is not None:
                chunk = decode_event(data)
                if chunk is None:
                    return
                yield chunk
            raise truncated_stream(self._call)
        except httpx.TransportError as e:
            raise transport_error(e, self._call) from e
        finally:
            self._resp.close()

    def text(self) -> str:
        """All the streamed text, joined."""
        return "".join(c.text for c in self)

    def close(self) -> None:
        self._consumed = True
        self._resp.close()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client:
    """Synchronous client for a retserve server.

    >>> from retserve_client import Client
    >>> with Client("http://127.0.0.1:8000", api_key="...") as client:
    ...     print(client.completions("Once upon a time", max_tokens=8, temperature=0).text)
    ...     s = client.create_session(prompt="Call me Ishmael.")
    ...     print(client.generate(s.id, " And then", max_tokens=8).text)

    `base_url` defaults to RETSERVE_URL, then http://127.0.0.1:8000; `api_key` to RETSERVE_API_KEY.
    429 / 503 are retried up to `max_retries` times, waiting at least the server's Retry-After, for
    idempotent calls (GET, DELETE, PUT state); pass `retry_non_idempotent=True` for the POSTs too.
    Sampling parameters (`max_tokens`, `temperature`, `stop`, `seed`, `token_dropping`, ...) go in
    `**params` as the server's JSON names. `http_client`: your own httpx client (its timeout, proxies
    and TLS settings apply; it is not closed by `close()`).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = 60.0,
        max_retries: int = 2,
        retry_non_idempotent: bool = False,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        on_retry: RetryHook | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self.config = Config(
            base_url, api_key, timeout, max_retries, retry_non_idempotent, backoff_s, max_backoff_s, on_retry
        )
        self._own_http = http_client is None
        self._http = http_client or httpx.Client(timeout=timeout)

    # -- transport ---------------------------------------------------------------------------------

    def _open(self, call: Call[Any]) -> httpx.Response:
        """The response to `call` (streamed if `call.stream`), after retries; typed error if not 2xx."""
        cfg = self.config
        attempt = 0
        while True:
            req = self._http.build_request(
                call.method,
                cfg.base_url + call.path,
                json=call.json,
                content=call.content,
                params=call.params,
                headers={
                    **cfg.headers(),
                    **({"Content-Type": "application/octet-stream"} if call.content is not None else {}),
                },
            )
            try:
                resp = self._http.send(req, stream=call.stream)
                if not resp.is_error:
                    return resp
                resp.read()
                resp.close()
                err: RetserveError = from_response(resp)
            except httpx.TransportError as e:
                err = transport_error(e, call)
            delay = cfg.retry_delay(attempt, err) if retryable(err) and cfg.may_retry(call, attempt) else None
            if delay is None:
                raise err
            attempt += 1
            if cfg.on_retry is not None:
                cfg.on_retry(attempt, delay, err)
            time.sleep(delay)

    def _send(self, call: Call[T]) -> T:
        resp = self._open(call)
        try:
            return call.parse(resp)
        except (ValueError, KeyError) as e:
            raise RetserveError(f"{call.method} {call.path}: unexpected response: {e}") from e

    def _maybe_stream(self, call: Call[Any]) -> Any:
        return Stream(self._open(call), call) if call.stream else self._send(call)

    # -- OpenAI-compatible -------------------------------------------------------------------------

    @overload
    def completions(
        self, prompt: str | Sequence[int], *, stream: Literal[False] = False, **params: Any
    ) -> Completion: ...

    @overload
    def completions(self, prompt: str | Sequence[int], *, stream: Literal[True], **params: Any) -> Stream: ...

    @overload
    def completions(
        self, prompt: str | Sequence[int], *, stream: bool = ..., **params: Any
    ) -> Completion | Stream: ...

    def completions(
        self, prompt: str | Sequence[int], *, stream: bool = False, **params: Any
    ) -> Completion | Stream:
        """`POST /v1/completions`: a `Completion`, or with `stream=True` a `Stream` of `Chunk`s.

        `prompt` is text or token ids; `**params`: max_tokens, temperature, top_p, top_k, stop, seed,
        logprobs, session_id, token_dropping, stream_options, ... (the server's JSON fields)."""
        return self._maybe_stream(Calls.completions(prompt, stream, params))

    @overload
    def chat(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[False] = False, **params: Any
    ) -> Completion: ...

    @overload
    def chat(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[True], **params: Any
    ) -> Stream: ...

    @overload
    def chat(
        self, messages: Sequence[Mapping[str, Any]], *, stream: bool = ..., **params: Any
    ) -> Completion | Stream: ...

    def chat(
        self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, **params: Any
    ) -> Completion | Stream:
        """`POST /v1/chat/completions`: a `Completion` (`text` = the answer), or a `Stream` of `Chunk`s.

        >>> client.chat([{"role": "user", "content": "Hello"}], max_tokens=16).text"""
        return self._maybe_stream(Calls.chat(messages, stream, params))

    def models(self) -> list[Model]:
        """`GET /v1/models`."""
        return self._send(Calls.models())

    def health(self) -> dict:
        """`GET /health` (`{"status": "ok"}` while the server runs)."""
        return self._send(Calls.health())

    # -- sessions ----------------------------------------------------------------------------------

    def create_session(
        self,
        session_id: str | None = None,
        prompt: str | Sequence[int] | None = None,
        token_dropping: dict | None = None,
    ) -> Session:
        """`POST /v1/sessions`: a new session (a random id unless `session_id`), primed with `prompt`."""
        return self._send(Calls.create_session(session_id, prompt, token_dropping))

    def prime(
        self, session_id: str, prompt: str | Sequence[int], token_dropping: dict | None = None
    ) -> Session:
        """`POST /v1/sessions/{id}/prime`: read more text into the session without generating."""
        return self._send(Calls.prime(session_id, prompt, token_dropping))

    @overload
    def generate(
        self,
        session_id: str,
        prompt: str | Sequence[int] = "",
        *,
        stream: Literal[False] = False,
        **params: Any,
    ) -> Completion: ...

    @overload
    def generate(
        self, session_id: str, prompt: str | Sequence[int] = "", *, stream: Literal[True], **params: Any
    ) -> Stream: ...

    @overload
    def generate(
        self, session_id: str, prompt: str | Sequence[int] = "", *, stream: bool = ..., **params: Any
    ) -> Completion | Stream: ...

    def generate(
        self, session_id: str, prompt: str | Sequence[int] = "", *, stream: bool = False, **params: Any
    ) -> Completion | Stream:
        """`POST /v1/sessions/{id}/generate`: continue the session (an empty prompt continues from its
        saved next-token logits); a `Completion`, or a `Stream` with `stream=True`."""
        return self._maybe_stream(Calls.generate(session_id, prompt, stream, params))

    def fork(self, session_id: str, new_id: str | None = None) -> Session:
        """`POST /v1/sessions/{id}/fork`: a copy under `new_id` (default: a random id)."""
        return self._send(Calls.fork(session_id, new_id))

    def merge(
        self,
        sources: Sequence[str],
        mode: str = "concat",
        weights: Sequence[float] | None = None,
        session_id: str | None = None,
    ) -> Session:
        """`POST /v1/sessions/merge`: a new session from 2-16 others' states (`concat` or `average`)."""
        return self._send(Calls.merge(sources, mode, weights, session_id))

    def get_session(self, session_id: str) -> Session:
        """`GET /v1/sessions/{id}`."""
        return self._send(Calls.get_session(session_id))

    def session_stats(self, session_id: str) -> SessionStats:
        """`GET /v1/sessions/{id}/stats`: tokens read, the state's bytes and its per-(layer, head) norms."""
        return self._send(Calls.session_stats(session_id))

    def list_sessions_page(self, limit: int = 20, cursor: str | None = None) -> SessionPage:
        """One page of `GET /v1/sessions` (`limit` 1-100)."""
        return self._send(Calls.list_page(limit, cursor))

    def list_sessions(self, page_size: int = 100) -> Iterator[Session]:
        """Every session of your tenant, fetching pages of `page_size` as it goes."""
        cursor: str | None = None
        while True:
            page = self.list_sessions_page(page_size, cursor)
            yield from page.data
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    def delete_session(self, session_id: str) -> bool:
        """`DELETE /v1/sessions/{id}` (NotFound if there is none)."""
        return self._send(Calls.delete_session(session_id))

    def export_state(self, session_id: str, path: str | os.PathLike[str] | None = None) -> bytes:
        """`GET /v1/sessions/{id}/state`: the state blob (also written to `path` when given)."""
        data = self._send(Calls.export_state(session_id))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    def import_state(
        self, session_id: str, data_or_path: bytes | bytearray | memoryview | str | os.PathLike[str]
    ) -> Session:
        """`PUT /v1/sessions/{id}/state`: a blob from `export_state` (bytes, or a file path)."""
        return self._send(Calls.import_state(session_id, read_state_arg(data_or_path)))

    # -- lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
