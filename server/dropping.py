"""Token dropping as requests ask for it: the `token_dropping` field (or the server's default) -> DropSpec.

A request that sends `token_dropping` replaces RETSERVE_TOKEN_DROPPING for itself; `"token_dropping":
null` (or any `keep: 1.0`) reads its prompt whole even when the server has a default. A request with no
prompt to read (a session continued from its saved logits) drops nothing.
"""

from __future__ import annotations

from model.config import RetNetConfig
from model.dropping import DropSpec
from server.errors import APIError
from server.protocol import TokenDropping

FIELD = "token_dropping"


def _spec(td: TokenDropping) -> DropSpec:
    return DropSpec(td.policy, td.keep, td.sinks, td.recent, td.from_layer, td.seed)


def to_spec(td: TokenDropping, config: RetNetConfig) -> DropSpec:
    """The engine's DropSpec for a validated request field (ValueError saying what to fix)."""
    spec = _spec(td)
    spec.check(config)
    return spec


def request_dropping(body: object, default: TokenDropping | None, config: RetNetConfig) -> DropSpec | None:
    """The DropSpec a request body asks for (its own `token_dropping`, else the server's default);
    None when nothing is dropped (off, or keep 1.0). APIError 400 for values the model cannot use."""
    fields_set: set[str] = getattr(body, "model_fields_set", set())
    td = getattr(body, FIELD, None) if FIELD in fields_set else default
    if td is None:
        return None
    try:
        spec = _spec(td)
    except ValueError as e:
        raise APIError(400, f"token_dropping: {e}", param=FIELD) from None
    try:
        spec.check(config)
    except ValueError as e:
        raise APIError(400, f"token_dropping.from_layer: {e}", param=f"{FIELD}.from_layer") from None
    return spec if spec.keep < 1 else None


def dropping_label(spec: DropSpec) -> str:
    """How a state was read, for its provenance (`token_dropping`)."""
    return (
        f"{spec.policy} keep={spec.keep:g} sinks={spec.sinks} recent={spec.recent}"
        f" from_layer={spec.from_layer}" + (f" seed={spec.seed}" if spec.policy == "random" else "")
    )
