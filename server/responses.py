"""Response models: what the routes send (the counterpart of protocol.py's request models).

OpenAI's shapes, plus the extension `session_id` on responses of requests that continue a session.
Fields that are None and marked `exclude_if` are left out of the JSON (as OpenAI leaves them out).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


def _absent_if_none(value: object) -> bool:
    return value is None


class PromptTokensDetails(BaseModel):
    dropped_tokens: int  # extension: prompt tokens the request's token dropping left out of the state


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # present when the request read its prompt with token dropping (`token_dropping`)
    prompt_tokens_details: PromptTokensDetails | None = Field(None, exclude_if=_absent_if_none)


class ResponseBase(BaseModel):
    """The fields every response and stream chunk of one request shares."""

    id: str
    object: str
    created: int
    model: str
    session_id: str | None = Field(None, exclude_if=_absent_if_none)  # extension: the session continued


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(ResponseBase):
    """A completion, and (object "text_completion" too) each chunk of a stream; usage: the whole
    response, or the last chunk of a stream that asked for it (`stream_options.include_usage`)."""

    choices: list[CompletionChoice]
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(ResponseBase):
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = Field(None, exclude_if=_absent_if_none)
    content: str | None = Field(None, exclude_if=_absent_if_none)


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(ResponseBase):
    choices: list[ChatChunkChoice]
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "retserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SessionObject(BaseModel):
    id: str
    object: Literal["session"] = "session"
    tokens: int  # tokens read into the state so far
    size_bytes: int
    version: int
    model: str
    fingerprint: str
    dtype: str
    created_at: float
    updated_at: float
    expires_in: float | None
    provenance: dict
    # create with a prompt, prime: the read's usage, when it was read with token dropping
    usage: Usage | None = Field(None, exclude_if=_absent_if_none)


class SessionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SessionObject]
    next_cursor: str | None
    has_more: bool


class SessionDeleted(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str  # what to fix
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
