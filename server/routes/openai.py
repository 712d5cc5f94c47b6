"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.deps import RuntimeDep, TenantDep
from server.dropping import request_dropping
from server.engine import RequestOutput, TokenLogprob
from server.engine.detokenizer import LeadingSpace
from server.protocol import ChatCompletionRequest, CompletionRequest, SessionGenerate, openai_finish_reason
from server.responses import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprob,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
)
from server.routes.common import (
    check_model,
    encode_prompt,
    final_result,
    response_base,
    sampling_params,
    start_generation,
    stream_response,
    usage,
)
from server.runtime import Runtime

router = APIRouter(prefix="/v1", tags=["openai"])


class ServedModelCard(ModelCard):
    context_length: int  # max_position_embeddings: the context it was trained on (retention has no limit)
    state_bytes_per_session: int  # one session's recurrent state, float32, whatever its length
    dtype: str  # of the weights as served


class ServedModelList(ModelList):
    data: list[ServedModelCard]


@router.get("/models")
async def list_models(rt: RuntimeDep, tenant: TenantDep) -> ServedModelList:
    cfg = rt.model.config
    card = ServedModelCard(
        id=rt.model_name,
        created=int(rt.started_at),
        context_length=cfg.max_position_embeddings,
        state_bytes_per_session=cfg.state_nbytes(4),
        dtype=str(rt.model.dtype).removeprefix("torch."),
    )
    return ServedModelList(data=[card])


def _tok_str(rt: Runtime, tid: int) -> str:
    return rt.tokenizer.token_bytes(tid).decode("utf-8", errors="replace")


def completion_logprobs(
    rt: Runtime, lps: list[TokenLogprob] | None, offset: int
) -> CompletionLogprobs | None:
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
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_lps, top_logprobs=tops, text_offset=offsets)


def chat_logprobs(rt: Runtime, lps: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if lps is None:
        return None

    def entry(tid: int, v: float) -> dict:
        b = rt.tokenizer.token_bytes(tid)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": v, "bytes": list(b)}

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **entry(lp.token_id, lp.logprob), top_logprobs=[ChatLogprob(**entry(t, v)) for t, v in lp.top]
            )
            for lp in lps
        ]
    )


async def serve_completion(
    body: CompletionRequest | SessionGenerate,
    request: Request,
    rt: Runtime,
    tenant: str,
    session_id: str | None,
) -> CompletionResponse | StreamingResponse:
    """A completion (streamed or not), continuing `session_id`'s state when given: what both
    /v1/completions and /v1/sessions/{id}/generate serve."""
    check_model(rt, body.model)
    ids = await encode_prompt(rt, body.prompt, allow_empty=session_id is not None)
    dropping = request_dropping(body, rt.settings.token_dropping, rt.model.config)
    n_lp = body.logprobs
    params = sampling_params(
        rt,
        body,
        body.max_tokens,
        rt.settings.default_max_tokens,
        logprobs=n_lp is not None,
        top_logprobs=n_lp or 0,
    )
    gen = await start_generation(rt, tenant, session_id, ids, params, dropping, isinstance(body.prompt, str))
    base = response_base(rt, "cmpl-", "text_completion", session_id)

    if body.stream:
        offset = 0

        def chunk(out: RequestOutput) -> list[CompletionResponse]:
            nonlocal offset
            if not out.text and not out.finished and not out.token_ids:
                return []
            reason = openai_finish_reason(out.finish_reason)
            lps = completion_logprobs(rt, out.logprobs, offset)
            offset += len(out.text)
            choice = CompletionChoice(text=out.text, logprobs=lps, finish_reason=reason)
            return [CompletionResponse(**base, choices=[choice])]

        def usage_chunk(u: Usage) -> CompletionResponse:
            return CompletionResponse(**base, choices=[], usage=u)

        return stream_response(gen, chunk, usage_chunk, body.stream_options)

    res, out = await final_result(gen, request)
    lps = completion_logprobs(rt, res.logprobs, 0) if n_lp is not None else None
    choice = CompletionChoice(
        text=res.text, logprobs=lps, finish_reason=openai_finish_reason(out.finish_reason)
    )
    return CompletionResponse(**base, choices=[choice], usage=usage(out, gen))


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request, rt: RuntimeDep, tenant: TenantDep):
    return await serve_completion(body, request, rt, tenant, body.session_id)


def chat_chunks(rt: Runtime, base: dict, out: RequestOutput, first: bool) -> list[ChatCompletionChunk]:
    """The SSE chunks of one engine delta: the assistant role first, then content, then the finish."""

    def chunk(delta: ChatDelta, logprobs: ChatLogprobs | None = None, reason: str | None = None):
        choice = ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=reason)
        return ChatCompletionChunk(**base, choices=[choice])

    chunks = [chunk(ChatDelta(role="assistant", content=""))] if first else []
    if out.text or out.token_ids:
        chunks.append(chunk(ChatDelta(content=out.text), chat_logprobs(rt, out.logprobs)))
    if out.finished:
        chunks.append(chunk(ChatDelta(), None, openai_finish_reason(out.finish_reason)))
    return chunks


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request, rt: RuntimeDep, tenant: TenantDep):
    check_model(rt, body.model)
    ids = await encode_prompt(rt, rt.chat.prompt_ids(body.messages, new_sequence=body.session_id is None))
    dropping = request_dropping(body, rt.settings.token_dropping, rt.model.config)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    params = sampling_params(
        rt,
        body,
        max_tokens,
        256,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        extra_stop=tuple(rt.chat.stop),
    )
    params.stop_token_ids.extend(t for t in rt.chat.stop_token_ids if t not in params.stop_token_ids)
    strip = LeadingSpace(rt.chat.strip_leading_space)
    gen = await start_generation(rt, tenant, body.session_id, ids, params, dropping)
    base = response_base(rt, "chatcmpl-", "chat.completion.chunk", body.session_id)

    if body.stream:
        sent = 0

        def chunk(out: RequestOutput) -> list[ChatCompletionChunk]:
            nonlocal sent
            sent += 1
            return chat_chunks(rt, base, replace(out, text=strip(out.text)), first=sent == 1)

        def usage_chunk(u: Usage) -> ChatCompletionChunk:
            return ChatCompletionChunk(**base, choices=[], usage=u)

        return stream_response(gen, chunk, usage_chunk, body.stream_options)

    res, out = await final_result(gen, request)
    lps = chat_logprobs(rt, res.logprobs) if body.logprobs else None
    message = ChatResponseMessage(content=strip(res.text))
    choice = ChatChoice(message=message, logprobs=lps, finish_reason=openai_finish_reason(out.finish_reason))
    resp_base = {**base, "object": "chat.completion"}
    return ChatCompletionResponse(**resp_base, choices=[choice], usage=usage(out, gen))
