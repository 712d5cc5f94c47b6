"""The asynchronous client: the same methods as `Client`, as coroutines (and async iterators)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
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


class AsyncStream:
    """The chunks of a streamed response (already opened: HTTP errors were raised by the call).

    Iterate it once; close it (or use `with`) to stop early, which ends the request on the server (a
    session keeps exactly the tokens delivered).

    >>> async with await client.completions("Hi", stream=True, max_tokens=8) as s:
    ...     async for chunk in s:
    ...         print(chunk.text, end="")
    """

    def __init__(self, resp: httpx.Response, call: Call[Any]) -> None:
        self._resp = resp
        self._call = call
        self._consumed = False

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        if self._consumed:
            raise RetserveError("this stream was already iterated (or closed): make the call again")
        self._consumed = True
        parser = SSEParser()
        try:
            async for line in self._resp.aiter_lines():
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
            await self._resp.aclose()

    async def text(self) -> str:
        """All the streamed text, joined."""
        return "".join([c.text async for c in self])

    async def aclose(self) -> None:
        self._consumed = True
        await self._resp.aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncClient:
    """Asynchronous client for a retserve server (the same arguments and methods as `Client`).

    >>> from retserve_client import AsyncClient
    >>> async with AsyncClient("http://127.0.0.1:8000") as client:
    ...     print((await client.completions("Once upon a time", max_tokens=8, temperature=0)).text)
    ...     async for s in client.list_sessions():
    ...         print(s.id, s.tokens)

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
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        self.config = Config(
            base_url, api_key, timeout, max_retries, retry_non_idempotent, backoff_s, max_backoff_s, on_retry
        )
        self._own_http = http_client is None
        self._http = http_client or httpx.AsyncClient(timeout=timeout)

    # -- transport ---------------------------------------------------------------------------------

    async def _open(self, call: Call[Any]) -> httpx.Response:
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
                resp = await self._http.send(req, stream=call.stream)
                if not resp.is_error:
                    return resp
                await resp.aread()
                await resp.aclose()
                err: RetserveError = from_response(resp)
            except httpx.TransportError as e:
                err = transport_error(e, call)
            delay = cfg.retry_delay(attempt, err) if retryable(err) and cfg.may_retry(call, attempt) else None
            if delay is None:
                raise err
            attempt += 1
            if cfg.on_retry is not None:
                cfg.on_retry(attempt, delay, err)
            await asyncio.sleep(delay)

    async def _send(self, call: Call[T]) -> T:
        resp = await self._open(call)
        try:
            return call.parse(resp)
        except (ValueError, KeyError) as e:
            raise RetserveError(f"{call.method} {call.path}: unexpected response: {e}") from e

    async def _maybe_stream(self, call: Call[Any]) -> Any:
        return AsyncStream(await self._open(call), call) if call.stream else await self._send(call)

    # -- OpenAI-compatible -------------------------------------------------------------------------

    @overload
    async def completions(
        self, prompt: str | Sequence[int], *, stream: Literal[False] = False, **params: Any
    ) -> Completion: ...

    @overload
    async def completions(
        self, prompt: str | Sequence[int], *, stream: Literal[True], **params: Any
    ) -> AsyncStream: ...

    @overload
    async def completions(
        self, prompt: str | Sequence[int], *, stream: bool = ..., **params: Any
    ) -> Completion | AsyncStream: ...

    async def completions(
        self, prompt: str | Sequence[int], *, stream: bool = False, **params: Any
    ) -> Completion | AsyncStream:
        """`POST /v1/completions`: a `Completion`, or with `stream=True` an `AsyncStream` of `Chunk`s.

        `prompt` is text or token ids; `**params`: max_tokens, temperature, top_p, top_k, stop, seed,
        logprobs, session_id, token_dropping, stream_options, ... (the server's JSON fields)."""
        return await self._maybe_stream(Calls.completions(prompt, stream, params))

    @overload
    async def chat(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[False] = False, **params: Any
    ) -> Completion: ...

    @overload
    async def chat(
        self, messages: Sequence[Mapping[str, Any]], *, stream: Literal[True], **params: Any
    ) -> AsyncStream: ...

    @overload
    async def chat(
        self, messages: Sequence[Mapping[str, Any]], *, stream: bool = ..., **params: Any
    ) -> Completion | AsyncStream: ...

    async def chat(
        self, messages: Sequence[Mapping[str, Any]], *, stream: bool = False, **params: Any
    ) -> Completion | AsyncStream:
        """`POST /v1/chat/completions`: a `Completion` (`text` = the answer), or an `AsyncStream` of `Chunk`s.

        >>> client.chat([{"role": "user", "content": "Hello"}], max_tokens=16).text"""
        return await self._maybe_stream(Calls.chat(messages, stream, params))

    async def models(self) -> list[Model]:
        """`GET /v1/models`."""
        return await self._send(Calls.models())

    async def health(self) -> dict:
        """`GET /health` (`{"status": "ok"}` while the server runs)."""
        return await self._send(Calls.health())

    # -- sessions ----------------------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str | None = None,
        prompt: str | Sequence[int] | None = None,
        token_dropping: dict | None = None,
    ) -> Session:
        """`POST /v1/sessions`: a new session (a random id unless `session_id`), primed with `prompt`."""
        return await self._send(Calls.create_session(session_id, prompt, token_dropping))

    async def prime(
        self, session_id: str, prompt: str | Sequence[int], token_dropping: dict | None = None
    ) -> Session:
        """`POST /v1/sessions/{id}/prime`: read more text into the session without generating."""
        return await self._send(Calls.prime(session_id, prompt, token_dropping))

    @overload
    async def generate(
        self,
        session_id: str,
        prompt: str | Sequence[int] = "",
        *,
        stream: Literal[False] = False,
        **params: Any,
    ) -> Completion: ...

    @overload
    async def generate(
        self, session_id: str, prompt: str | Sequence[int] = "", *, stream: Literal[True], **params: Any
    ) -> AsyncStream: ...

    @overload
    async def generate(
        self, session_id: str, prompt: str | Sequence[int] = "", *, stream: bool = ..., **params: Any
    ) -> Completion | AsyncStream: ...

    async def generate(
        self, session_id: str, prompt: str | Sequence[int] = "", *, stream: bool = False, **params: Any
    ) -> Completion | AsyncStream:
        """`POST /v1/sessions/{id}/generate`: continue the session (an empty prompt continues from its
        saved next-token logits); a `Completion`, or an `AsyncStream` with `stream=True`."""
        return await self._maybe_stream(Calls.generate(session_id, prompt, stream, params))

    async def fork(self, session_id: str, new_id: str | None = None) -> Session:
        """`POST /v1/sessions/{id}/fork`: a copy under `new_id` (default: a random id)."""
        return await self._send(Calls.fork(session_id, new_id))

    async def merge(
        self,
        sources: Sequence[str],
        mode: str = "concat",
        weights: Sequence[float] | None = None,
        session_id: str | None = None,
    ) -> Session:
        """`POST /v1/sessions/merge`: a new session from 2-16 others' states (`concat` or `average`)."""
        return await self._send(Calls.merge(sources, mode, weights, session_id))

    async def get_session(self, session_id: str) -> Session:
        """`GET /v1/sessions/{id}`."""
        return await self._send(Calls.get_session(session_id))

    async def session_stats(self, session_id: str) -> SessionStats:
        """`GET /v1/sessions/{id}/stats`: tokens read, the state's bytes and its per-(layer, head) norms."""
        return await self._send(Calls.session_stats(session_id))

    async def list_sessions_page(self, limit: int = 20, cursor: str | None = None) -> SessionPage:
        """One page of `GET /v1/sessions` (`limit` 1-100)."""
        return await self._send(Calls.list_page(limit, cursor))

    async def list_sessions(self, page_size: int = 100) -> AsyncIterator[Session]:
        """Every session of your tenant, fetching pages of `page_size` as it goes."""
        cursor: str | None = None
        while True:
            page = await self.list_sessions_page(page_size, cursor)
            for s in page.data:
                yield s
            if not page.has_more or page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def delete_session(self, session_id: str) -> bool:
        """`DELETE /v1/sessions/{id}` (NotFound if there is none)."""
        return await self._send(Calls.delete_session(session_id))

    async def export_state(self, session_id: str, path: str | os.PathLike[str] | None = None) -> bytes:
        """`GET /v1/sessions/{id}/state`: the state blob (also written to `path` when given)."""
        data = await self._send(Calls.export_state(session_id))
        if path is not None:
            Path(path).write_bytes(data)
        return data

    async def import_state(
        self, session_id: str, data_or_path: bytes | bytearray | memoryview | str | os.PathLike[str]
    ) -> Session:
        """`PUT /v1/sessions/{id}/state`: a blob from `export_state` (bytes, or a file path)."""
        return await self._send(Calls.import_state(session_id, read_state_arg(data_or_path)))

    # -- lifetime ----------------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
