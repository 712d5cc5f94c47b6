"""HTTP protocol models (OpenAI-compatible JSON names), converted to engine types with `to_sampling_params()`.

These are not engine types: the engine never sees them. Extensions to the OpenAI schema are
documented in the README: `session_id`, `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from server.engine import EngineSamplingParams

SESSION_ID_PATTERN = r"^[A-Za-z0-9_.@+=~-]{1,128}$"  # request bodies and the /v1/sessions/{id} paths
RESERVED_SESSION_IDS = ("merge",)  # path segments of /v1/sessions/... that are not sessions
NOT_RESERVED = {"not": {"enum": list(RESERVED_SESSION_IDS)}}  # the same in JSON Schema


def _not_reserved(v: str) -> str:
    if v in RESERVED_SESSION_IDS:
        raise ValueError(f"{v!r} is reserved (POST /v1/sessions/{v} is an endpoint): pick another session id")
    return v


SessionId = Annotated[
    str, Field(pattern=SESSION_ID_PATTERN, json_schema_extra=NOT_RESERVED), AfterValidator(_not_reserved)
]


def _integral(v: object) -> object:
    """JSON Schema counts 3.0 as an integer: take it as 3 (3.5 stays a float and is refused)."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


JSONInt = Annotated[int, BeforeValidator(_integral)]  # in a StrictModel: no booleans, no strings
StopString = Annotated[str, Field(min_length=1)]
TokenIdKey = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]{0,9})$")]  # a token id as a JSON object key
Bias = Annotated[float, Field(ge=-100, le=100)]  # OpenAI's range


class StrictModel(BaseModel):
    """A request body: unknown fields are a 400 that names them, and JSON types are taken as sent
    (no "yes" or 1 for a boolean, no "0.5" for a number; an integer is still a valid float)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


class TokenDropping(StrictModel):
    """Extension: read the prompt with a token-dropping policy (model/dropping.py); keep 1.0 = none.

    Replaces the server's default (RETSERVE_TOKEN_DROPPING) for this request; `null` turns it off."""

    policy: Literal["decayed", "norm", "recency", "random"] = "decayed"
    keep: float = Field(gt=0, le=1)  # the fraction of the prompt's tokens kept
    sinks: JSONInt = Field(4, ge=0, le=2**31)  # the first tokens, always kept
    recent: JSONInt = Field(64, ge=0, le=2**31)  # the last tokens, always kept
    from_layer: JSONInt = Field(1, ge=0, le=2**31)  # layers below it read every token
    seed: JSONInt = Field(0, ge=0, le=2**53 - 1)  # the `random` policy's


class SamplingFields(StrictModel):
    """Fields shared by completions, chat and session generation."""

    model: str | None = None
    max_tokens: JSONInt | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    n: JSONInt = Field(1, ge=1, le=1)  # one choice per request (send several requests for more)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | list[StopString] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[TokenIdKey, Bias] | None = None
    seed: JSONInt | None = Field(None, ge=0, le=2**53 - 1)  # exact in every JSON parser
    user: str | None = None
    # extensions
    session_id: SessionId | None = None
    top_k: JSONInt = Field(0, ge=0, lt=2**31)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=100)
    min_tokens: JSONInt = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[JSONInt, Field(ge=0)]] | None = None
    token_dropping: TokenDropping | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling_params(
        self,
        max_tokens: int,
        logprobs: bool = False,
        top_logprobs: int = 0,
        extra_stop: tuple[str, ...] = (),
    ) -> EngineSamplingParams:
        """Engine parameters; `max_tokens` is the caller's resolved limit (request value or default)."""
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError("logit_bias keys must be token ids (integers as strings)") from None
        return EngineSamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            logit_bias=bias,
            max_tokens=max_tokens,
            min_tokens=min(self.min_tokens, max_tokens),
            stop=[*self.stop_list(), *extra_stop],
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )


class CompletionRequest(SamplingFields):
    prompt: str | list[JSONInt]  # text, or token ids
    logprobs: JSONInt | None = Field(None, ge=0, le=20)  # report the chosen token and this many alternatives


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]  # text parts are joined by newlines
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, v: object) -> object:
        """A clear 400 for the part types OpenAI has and this text-only server does not read."""
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(
                        f"content part {i} has type {kind!r}: this server reads text only;"
                        ' send {"type": "text", "text": "..."} parts or a string'
                    )
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    # the OpenAPI document states the top_logprobs rule too (JSON Schema if/then)
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
            "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}},
        }
    )
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: JSONInt | None = Field(None, ge=0, le=20)  # OpenAI: only with logprobs: true
    max_completion_tokens: JSONInt | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        mct, mt = self.max_completion_tokens, self.max_tokens
        if mct is not None and mt is not None and mct != mt:
            raise ValueError(
                f"max_completion_tokens ({mct}) and max_tokens ({mt}) differ: send one of them"
                " (max_tokens is OpenAI's older name)"
            )
        return self

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and info.data.get("logprobs") is False:
            raise ValueError("top_logprobs needs logprobs: true (OpenAI's rule); send both or neither")
        return v


class SessionCreate(StrictModel):
    session_id: SessionId | None = None  # your own name within your tenant; default: a random id
    prompt: str | list[JSONInt] | None = None  # text (or token ids) to read into the new state
    token_dropping: TokenDropping | None = None  # how the prompt is read (see SamplingFields)


class SessionPrime(StrictModel):
    prompt: str | list[JSONInt]
    token_dropping: TokenDropping | None = None


class SessionMerge(StrictModel):
    """POST /v1/sessions/merge: a new session from the states of 2.. sessions (model/memory.py)."""

    sources: list[SessionId] = Field(min_length=2, max_length=16)
    mode: Literal["concat", "average"]
    weights: list[float] | None = None  # average only: one per source, >= 0, summing to 1
    session_id: SessionId | None = None  # the new session's name; default: a random id


class SessionFork(StrictModel):
    session_id: SessionId | None = None  # the copy's name; default: a random id


class SessionGenerate(SamplingFields):
    prompt: str | list[JSONInt] = ""  # empty: continue from the session's saved next-token logits
    logprobs: JSONInt | None = Field(None, ge=0, le=20)


# engine finish reasons -> OpenAI finish_reason
FINISH_REASONS = {
    "eos": "stop",
    "stop_token": "stop",
    "stop": "stop",
    "length": "length",
    "abort": "abort",
    "error": "error",
}


def openai_finish_reason(engine_reason: str | None) -> str | None:
    """OpenAI's finish_reason for an engine one (None while the request runs)."""
    return FINISH_REASONS.get(engine_reason, "abort") if engine_reason else None
