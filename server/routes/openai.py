"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.chat import CHAT_STOP, render_chat
from server.deps import RuntimeDep, TenantDep
from server.engine import RequestOutput, TokenLogprob
from server.protocol import ChatCompletionRequest, CompletionRequest, SessionGenerate
from server.routes.common import (
    check_model,
    encode_prompt,
    final_result,
    finish_reason,
    response_base,
    sampling_params,
    start_generation,
    stream_response,
    usage_json,
)
from server.runtime import Runtime

router = APIRouter(prefix="/v1", tags=["openai"])


@router.get("/models")
async def list_models(rt: RuntimeDep, tenant: TenantDep) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": rt.model_name, "object": "model", "created": int(rt.started_at), "owned_by": "retserve"}
        ],
    }


def _tok_str(rt: Runtime, tid: int) -> str:
    return rt.tokenizer.token_bytes(tid).decode("utf-8", errors="replace")


def completion_logprobs(rt: Runtime, lps: list[TokenLogprob] | None, offset: int) -> dict | None:
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        s = _tok_str(rt, lp.token_id)
        tokens.append(s)
        token_lps.append(lp.logprob)
        tops.append({_tok_str(rt, t): v for t, v in lp.top})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(rt: Runtime, lps: list[TokenLogprob] | None) -> dict | None:
    if lps is None:
        return None

    def entry(tid: int, v: float) -> dict:
        b = rt.tokenizer.token_bytes(tid)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": v, "bytes": list(b)}

    return {
        "content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in lps
        ]
    }


async def serve_completion(
    body: CompletionRequest | SessionGenerate,
    request: Request,
    rt: Runtime,
    tenant: str,
    session_id: str | None,
):
    """A completion (streamed or not), continuing `session_id`'s state when given: what both
    /v1/completions and /v1/sessions/{id}/generate serve."""
    check_model(rt, body.model)
    ids = await encode_prompt(rt, body.prompt)
    n_lp = body.logprobs
    params = sampling_params(
        rt,
        body,
        body.max_tokens,
        rt.settings.default_max_tokens,
        logprobs=n_lp is not None,
        top_logprobs=n_lp or 0,
    )
    gen = await start_generation(rt, tenant, session_id, ids, params)
    base = response_base(rt, "cmpl-", "text_completion", session_id)

    if body.stream:
        offset = 0

        def chunk(out: RequestOutput) -> list[dict]:
            nonlocal offset
            if not out.text and not out.finished and not out.token_ids:
                return []
            choice = {
                "text": out.text,
                "index": 0,
                "logprobs": completion_logprobs(rt, out.logprobs, offset),
                "finish_reason": finish_reason(out) if out.finished else None,
            }
            offset += len(out.text)
            return [{**base, "choices": [choice]}]

        return stream_response(gen, chunk, base, body.stream_options)

    res, out = await final_result(gen, request)
    lps = completion_logprobs(rt, res.logprobs, 0) if n_lp is not None else None
    return {
        **base,
        "choices": [{"text": res.text, "index": 0, "logprobs": lps, "finish_reason": finish_reason(out)}],
        "usage": usage_json(out),
    }


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request, rt: RuntimeDep, tenant: TenantDep):
    return await serve_completion(body, request, rt, tenant, body.session_id)


def chat_chunks(rt: Runtime, base: dict, out: RequestOutput, first: bool) -> list[dict]:
    """The SSE chunks of one engine delta: the assistant role first, then content, then the finish."""

    def choice(delta: dict, logprobs: dict | None = None, reason: str | None = None) -> dict:
        return {
            **base,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
        }

    chunks = [choice({"role": "assistant", "content": ""})] if first else []
    if out.text or out.token_ids:
        chunks.append(choice({"content": out.text}, chat_logprobs(rt, out.logprobs)))
    if out.finished:
        chunks.append(choice({}, None, finish_reason(out)))
    return chunks


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, rt: RuntimeDep, tenant: TenantDep):
    check_model(rt, body.model)
    ids = await encode_prompt(rt, render_chat(body.messages))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(
        rt,
        body,
        max_tokens,
        256,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        extra_stop=tuple(CHAT_STOP),
    )
    gen = await start_generation(rt, tenant, body.session_id, ids, params)
    base = response_base(rt, "chatcmpl-", "chat.completion.chunk", body.session_id)

    if body.stream:
        sent = 0

        def chunk(out: RequestOutput) -> list[dict]:
            nonlocal sent
            sent += 1
            return chat_chunks(rt, base, out, first=sent == 1)

        return stream_response(gen, chunk, base, body.stream_options)

    res, out = await final_result(gen, request)
    lps = chat_logprobs(rt, res.logprobs) if body.logprobs else None
    message = {"role": "assistant", "content": res.text}
    return {
        **base,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": lps, "finish_reason": finish_reason(out)}],
        "usage": usage_json(out),
    }
