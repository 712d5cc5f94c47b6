"""Typed responses (dataclasses). Each keeps the server's JSON in `raw` for fields not mapped here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Token counts of one request; `dropped_tokens` is set when the prompt was read with token dropping
    (`usage.prompt_tokens_details.dropped_tokens`), else None."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    dropped_tokens: int | None = None

    @classmethod
    def from_json(cls, obj: dict | None) -> Usage | None:
        if not obj:
            return None
        details = obj.get("prompt_tokens_details") or {}
        return cls(
            prompt_tokens=int(obj.get("prompt_tokens", 0)),
            completion_tokens=int(obj.get("completion_tokens", 0)),
            total_tokens=int(obj.get("total_tokens", 0)),
            dropped_tokens=details.get("dropped_tokens"),
        )


@dataclass(frozen=True)
class Completion:
    """A whole completion (completions, session generate) or chat answer (`text` = the message content).

    >>> c = client.completions("Once upon a time", max_tokens=8, temperature=0)
    >>> c.text, c.finish_reason, c.usage.completion_tokens
    """

    id: str
    text: str
    finish_reason: str | None
    usage: Usage | None
    model: str
    session_id: str | None = None  # the session it continued, if any
    logprobs: dict | None = None  # the choice's logprobs object as sent
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: dict) -> Completion:
        choice = obj["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice.get("text", "")
        return cls(
            id=obj.get("id", ""),
            text=text,
            finish_reason=choice.get("finish_reason"),
            usage=Usage.from_json(obj.get("usage")),
            model=obj.get("model", ""),
            session_id=obj.get("session_id"),
            logprobs=choice.get("logprobs"),
            raw=obj,
        )


@dataclass(frozen=True)
class Chunk:
    """One event of a stream: `text` is the new text (completion `text` or chat `delta.content`; "" for
    the role-only first chat chunk and the usage chunk); `usage` only on the last chunk when asked for
    (`stream_options={"include_usage": True}`).

    >>> "".join(ch.text for ch in client.completions("Hi", stream=True, max_tokens=8))
    """

    text: str
    finish_reason: str | None
    usage: Usage | None
    id: str
    session_id: str | None = None
    logprobs: dict | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: dict) -> Chunk:
        choices = obj.get("choices") or []
        text, reason, logprobs = "", None, None
        if choices:
            c = choices[0]
            delta = c.get("delta")
            text = ((delta or {}).get("content") or "") if "delta" in c else (c.get("text") or "")
            reason, logprobs = c.get("finish_reason"), c.get("logprobs")
        return cls(
            text=text,
            finish_reason=reason,
            usage=Usage.from_json(obj.get("usage")),
            id=obj.get("id", ""),
            session_id=obj.get("session_id"),
            logprobs=logprobs,
            raw=obj,
        )


@dataclass(frozen=True)
class Session:
    """A session's metadata (create, get, list, prime, fork, merge, import).

    `tokens`: tokens read into its state so far; `size_bytes`: the stored state; `version`: bumped on
    every save; `provenance`: where it came from (`primed_from`, `forked_from`, `merged_from`,
    `merge_mode`, `merge_weights`, ...); `usage`: the read's usage when a create/prime dropped tokens.

    >>> s = client.create_session("doc", prompt="Call me Ishmael.")
    >>> s.tokens, s.size_bytes
    """

    id: str
    tokens: int
    size_bytes: int
    version: int
    model: str
    fingerprint: str
    dtype: str
    created_at: float
    updated_at: float
    expires_in: float | None
    provenance: dict[str, Any]
    usage: Usage | None = None
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: dict) -> Session:
        return cls(
            id=obj["id"],
            tokens=int(obj["tokens"]),
            size_bytes=int(obj["size_bytes"]),
            version=int(obj["version"]),
            model=obj.get("model", ""),
            fingerprint=obj.get("fingerprint", ""),
            dtype=obj.get("dtype", ""),
            created_at=float(obj.get("created_at", 0.0)),
            updated_at=float(obj.get("updated_at", 0.0)),
            expires_in=obj.get("expires_in"),
            provenance=dict(obj.get("provenance") or {}),
            usage=Usage.from_json(obj.get("usage")),
            raw=obj,
        )


@dataclass(frozen=True)
class SessionStats:
    """`GET /v1/sessions/{id}/stats`: what a session's memory looks like.

    `tokens`: tokens read; `state_bytes`: the recurrent state's size in memory (fixed whatever `tokens`);
    `state_norms[layer][head]`: the Frobenius norm of each head's state matrix. Other fields the server
    sends (`stored_bytes`, `state_shape`, `dtype`, `version`, ...) are in `raw`.
    """

    id: str
    tokens: int
    state_bytes: int
    num_layers: int
    num_heads: int
    state_norms: list[list[float]]
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, obj: dict) -> SessionStats:
        return cls(
            id=obj["id"],
            tokens=int(obj["tokens"]),
            state_bytes=int(obj["state_bytes"]),
            num_layers=int(obj["num_layers"]),
            num_heads=int(obj["num_heads"]),
            state_norms=[[float(x) for x in layer] for layer in obj.get("state_norms") or []],
            raw=obj,
        )


@dataclass(frozen=True)
class SessionPage:
    """One page of `GET /v1/sessions`; pass `next_cursor` back as `cursor` for the next one."""

    data: list[Session]
    next_cursor: str | None
    has_more: bool

    @classmethod
    def from_json(cls, obj: dict) -> SessionPage:
        return cls(
            data=[Session.from_json(s) for s in obj.get("data", [])],
            next_cursor=obj.get("next_cursor"),
            has_more=bool(obj.get("has_more")),
        )


@dataclass(frozen=True)
class Model:
    """An entry of `GET /v1/models`."""

    id: str
    created: int
    owned_by: str

    @classmethod
    def from_json(cls, obj: dict) -> Model:
        return cls(id=obj["id"], created=int(obj.get("created", 0)), owned_by=obj.get("owned_by", ""))
