"""Shared by the completion-style routes: prompt checks, session-bound generations, SSE framing."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from model.dropping import DropSpec
from server.engine import EngineSamplingParams, RequestOutput
from server.errors import APIError
from server.generation import Collected, Generation, SessionTarget
from server.protocol import SamplingFields, StreamOptions
from server.responses import PromptTokensDetails, Usage
from server.runtime import Runtime

ENGINE_ERROR = "the engine failed while serving this request (logged; the session was not changed); retry"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def check_model(rt: Runtime, model: str | None) -> None:
    if model is not None and model != rt.model_name:
        raise APIError(
            404,
            f"model {model!r} is not served here; GET /v1/models lists {rt.model_name!r}",
            param="model",
            code="model_not_found",
        )


async def encode_prompt(rt: Runtime, prompt: str | list[int], *, allow_empty: bool = False) -> list[int]:
    """Token ids of a prompt (400 if out of range or too long; if empty unless `allow_empty`: a session
    continued from its saved logits)."""
    if isinstance(prompt, str):
        # a long text (up to the body limit: megabytes) is tokenized off the event loop
        ids = (
            rt.tokenizer.encode(prompt)
            if len(prompt) < 16384
            else await asyncio.to_thread(rt.tokenizer.encode, prompt)
        )
    else:
        ids = list(prompt)
        bad = [t for t in ids if not 0 <= t < rt.model.config.vocab_size]
        if bad:
            raise APIError(
                400,
                f"prompt token ids must be in [0, {rt.model.config.vocab_size}); got {bad[0]}",
                param="prompt",
            )
    if not ids and not allow_empty:
        raise APIError(
            400,
            "the prompt is empty: send at least one token of text (a session's next token needs new input)",
            param="prompt",
        )
    if len(ids) > rt.settings.max_prompt_tokens:
        raise APIError(
            400,
            f"the prompt has {len(ids)} tokens; the limit is {rt.settings.max_prompt_tokens}"
            " (prime a session in several requests for longer documents)",
            param="prompt",
            code="context_length_exceeded",
        )
    return ids


def sampling_params(
    rt: Runtime, body: SamplingFields, max_tokens: int | None, default_max: int, **kw
) -> EngineSamplingParams:
    limit = rt.settings.max_tokens_limit
    if max_tokens is not None and max_tokens > limit:
        raise APIError(
            400, f"max_tokens is {max_tokens}; this server allows at most {limit}", param="max_tokens"
        )
    try:
        params = body.to_sampling_params(min(default_max, limit) if max_tokens is None else max_tokens, **kw)
        params.validate_engine(rt.model.config.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return params


async def start_generation(
    rt: Runtime,
    tenant: str,
    session_id: str | None,
    ids: list[int],
    params: EngineSamplingParams,
    dropping: DropSpec | None = None,
    text: bool = False,
) -> Generation:
    """A started generation, continuing `session_id` when given (APIError if it could not start);
    `text`: the prompt was text (BOS where it starts a sequence: `Generation`)."""
    target = SessionTarget(tenant, session_id) if session_id is not None else None
    gen = Generation(rt, ids, params, target, dropping, text)
    await gen.start()
    if session_id is not None:
        rt.metrics.sessions.labels(event="resumed").inc()
    return gen


def usage(out: RequestOutput, gen: Generation | None = None) -> Usage:
    """The response's usage; `prompt_tokens_details.dropped_tokens` when `gen` read with dropping."""
    u = out.usage
    p, c = (u.prompt_tokens, u.completion_tokens) if u else (0, 0)
    details = None
    if gen is not None and gen.request.dropping is not None:
        details = PromptTokensDetails(dropped_tokens=u.dropped_tokens if u else 0)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c, prompt_tokens_details=details)


def final_error(gen: Generation, out: RequestOutput) -> APIError | None:
    """What the client must hear about a finished request instead of (or, in a stream, after) its
    tokens: an abort, an engine failure, or a session state that could not be saved."""
    if out.finish_reason == "abort":
        return APIError(503, "the request was aborted (the server is shutting down); retry", code="aborted")
    if out.finish_reason == "error":
        return APIError(500, ENGINE_ERROR, code="engine_error")
    if gen.save_error is not None:
        return APIError(
            gen.save_error.status,
            f"the completion finished but the session state was not saved: {gen.save_error.message}",
            code=gen.save_error.code,
        )
    return None


def sse(obj: BaseModel | dict | str) -> str:
    if isinstance(obj, BaseModel):
        return f"data: {obj.model_dump_json()}\n\n"
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


async def final_result(gen: Generation, request: Request) -> tuple[Collected, RequestOutput]:
    """Non-streaming: the whole completion, or the error the client must hear instead.

    A client that disconnects while waiting aborts the request (its session is still saved).
    """

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gen.abort()

    watcher = asyncio.get_running_loop().create_task(watch_disconnect())
    try:
        res = await gen.result()
    finally:
        watcher.cancel()
    assert res.final is not None
    if (err := final_error(gen, res.final)) is not None:
        raise err
    return res, res.final


def stream_response(
    gen: Generation,
    chunk: Callable[[RequestOutput], list[BaseModel]],
    usage_chunk: Callable[[Usage], BaseModel],
    options: StreamOptions | None,
) -> StreamingResponse:
    """SSE: `chunk(out)` for every delta, `usage_chunk(usage)` if asked (`stream_options.include_usage`),
    errors as error objects, then [DONE].

    A client that disconnects aborts the engine request; the generation still saves its session.
    """
    include_usage = options is not None and options.include_usage

    async def events() -> AsyncIterator[str]:
        finished = False
        try:
            async for out in gen.outputs():
                for c in chunk(out):
                    yield sse(c)
                if out.finished:
                    finished = True
                    if (err := final_error(gen, out)) is not None:
                        yield sse(err.body())
                    if include_usage:
                        yield sse(usage_chunk(usage(out, gen)))
            yield sse("[DONE]")
        finally:
            if not finished:
                gen.abort()

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def response_base(rt: Runtime, id_prefix: str, obj: str, session_id: str | None) -> dict:
    """The fields every response / chunk of one request shares (`ResponseBase`'s)."""
    return {
        "id": id_prefix + secrets.token_hex(12),
        "object": obj,
        "created": int(time.time()),
        "model": rt.model_name,
        "session_id": session_id,
    }
