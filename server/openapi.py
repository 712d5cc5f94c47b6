"""The OpenAPI document, made to say what the server does: FastAPI's own document plus the error
responses every route can give (OpenAI error objects: 400 for bad input, never FastAPI's 422), the
Bearer auth (when keys are configured), state blobs as application/octet-stream, the SSE streams of
the completion routes, and the Prometheus text of /metrics.

Which errors an operation documents follows from what its route depends on (see `error_codes`), so a
new route gets them without being listed here.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from server.bodylimit import depends_on, flat_routes, route_kind
from server.deps import get_runtime
from server.settings import Settings

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
ERROR_SCHEMA: dict[str, Any] = {
    "title": "ErrorResponse",
    "type": "object",
    "description": "An OpenAI error object; `message` says what to fix.",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "additionalProperties": False,
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
        }
    },
}
READY_SCHEMA: dict[str, Any] = {
    "title": "Readiness",
    "type": "object",
    "required": ["status", "checks", "problems"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not ready"]},
        "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
        "problems": {"type": "array", "items": {"type": "string"}},
    },
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
DESCRIPTIONS = {
    400: "Invalid request: a field, a parameter or the JSON itself (the message names it)",
    401: "Missing or invalid API key (`Authorization: Bearer <key>`)",
    404: "Not found: the session (in your tenant) or the model",
    405: "Method not allowed",
    409: "The session is in use by another request, or (create, fork, merge) already exists",
    413: "The body is over RETSERVE_MAX_BODY_BYTES (JSON) or RETSERVE_MAX_STATE_BYTES (state blobs)",
    415: "A JSON endpoint got a body without `Content-Type: application/json`",
    429: "Rate limit of the API key exceeded (see Retry-After)",
    500: "The engine failed on this request's batch (`engine_error`; a session keeps its previous state)",
    503: "Starting up, overloaded, shutting down, the state store is unreachable, or too many state"
    " uploads at once (see Retry-After)",
}
STREAMING = {"/v1/completions", "/v1/chat/completions", "/v1/sessions/{session_id}/generate"}
SSE_SCHEMA = {  # one server-sent event
    "type": "object",
    "description": "With `stream: true`: server-sent events whose `data` is a chunk (JSON), an error"
    " object if the request fails midway, and finally `[DONE]`.",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
}
BINARY = {"schema": {"type": "string", "format": "binary"}}
# what a route's own code can answer beyond what its dependencies imply (method, path) -> statuses
ROUTE_ERRORS: dict[tuple[str, str], set[int]] = {
    ("POST", "/v1/completions"): {404, 409, 500},
    ("POST", "/v1/chat/completions"): {404, 409, 500},
    ("POST", "/v1/sessions"): {409, 500},
    ("POST", "/v1/sessions/{session_id}/prime"): {409, 500},
    ("POST", "/v1/sessions/{session_id}/generate"): {409, 500},
    ("POST", "/v1/sessions/{session_id}/fork"): {409},
    ("POST", "/v1/sessions/merge"): {404, 409},
    ("DELETE", "/v1/sessions/{session_id}"): {405, 409},  # 405: a reserved id (/v1/sessions/merge)
    ("GET", "/v1/sessions/{session_id}"): {405},
    ("GET", "/v1/sessions/{session_id}/state"): {409},
    ("GET", "/v1/sessions/{session_id}/stats"): {409},  # a stored state that does not fit the model
    ("PUT", "/v1/sessions/{session_id}/state"): {409},
}


def error_codes(route: APIRoute, method: str, op: dict, settings: Settings) -> set[int]:
    """The error statuses an operation can answer, from what its route depends on."""
    kind = route_kind(route)
    codes = set(ROUTE_ERRORS.get((method, route.path_format), set()))
    if op.get("parameters") or op.get("requestBody") or kind.state_upload:
        codes.add(400)
    if kind.needs_tenant:
        codes |= {429, 503} | ({401} if settings.api_keys else set())
    if depends_on(route.dependant, get_runtime):
        codes.add(503)
    if kind.json_body:
        codes |= {413, 415}
    if kind.state_upload:
        codes |= {413, 503}
    if "{session_id}" in route.path_format:
        codes.add(404)
    return codes


def _patch_operation(route: APIRoute, method: str, op: dict, settings: Settings) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    responses.pop("422", None)
    for code in sorted(error_codes(route, method, op, settings)):
        entry: dict[str, Any] = {
            "description": DESCRIPTIONS[code],
            "content": {"application/json": {"schema": ERROR_REF}},
        }
        if code in (429, 503):
            entry["headers"] = RETRY_AFTER
        responses[str(code)] = entry
    kind = route_kind(route)
    if kind.needs_tenant and settings.api_keys:
        op["security"] = [{"bearerAuth": []}]
    ok = responses.get("200")
    if kind.state_upload:
        op["requestBody"] = {
            "required": True,
            "description": "A state blob exported by GET .../state (any server of the same checkpoint)",
            "content": {"application/octet-stream": BINARY},
        }
    if ok is None:
        return
    if method == "GET" and route.path_format.endswith("/state"):
        ok["content"] = {"application/octet-stream": BINARY}
    elif route.path_format in STREAMING:
        ok.setdefault("content", {}).setdefault("application/json", {"schema": {"type": "object"}})
        ok["content"]["text/event-stream"] = {"schema": SSE_SCHEMA}
    elif route.path_format == "/metrics":
        ok["content"] = {
            "text/plain": {"schema": {"type": "string", "description": "Prometheus text format"}}
        }
    elif route.path_format == "/ready":
        ok["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}
        responses["503"] = {
            "description": "Not ready: the model, the engine or the state store (see `problems`)",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}},
        }


def int_below(n: int) -> str:
    """A regex for the decimal integers in [0, n) without leading zeros (n >= 1)."""
    top = str(n - 1)
    alts = ["0"] if n - 1 >= 0 else []
    if len(top) > 1:  # every shorter number
        alts.append(f"[1-9][0-9]{{0,{len(top) - 2}}}")
    for i, d in enumerate(top):  # same length: equal to a prefix of `top`, then a smaller digit
        lo = "1" if i == 0 else "0"
        if int(d) > int(lo):
            rest = len(top) - i - 1
            alts.append(top[:i] + f"[{lo}-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    alts.append(top)
    return "^(" + "|".join(dict.fromkeys(alts)) + ")$"


def _branches(prop: dict) -> list[dict]:
    return prop.get("anyOf", [prop])


CONTINUABLE = {"CompletionRequest", "SessionGenerate"}  # request schemas whose prompt may be empty


def constrain(schemas: dict[str, Any], settings: Settings, vocab: int | None) -> None:
    """State in the request schemas the limits the server checks itself (with its own messages):
    non-empty prompts of at most max_prompt_tokens ids below the vocabulary size, max_tokens up to
    max_tokens_limit, token ids in stop_token_ids and logit_bias below the vocabulary size."""
    for schema_name, schema in schemas.items():
        props = schema.get("properties", {})
        for name in ("max_tokens", "max_completion_tokens"):
            for b in _branches(props.get(name, {})):
                if b.get("type") == "integer":
                    b["maximum"] = settings.max_tokens_limit
        may_be_empty = schema_name in CONTINUABLE  # an empty prompt continues a session from its saved logits
        for b in _branches(props.get("prompt", {})):
            if b.get("type") == "string" and not may_be_empty:
                b["minLength"] = 1
            elif b.get("type") == "array":
                b.update(maxItems=settings.max_prompt_tokens, **({} if may_be_empty else {"minItems": 1}))
                b["items"]["minimum"] = 0
                if vocab is not None:
                    b["items"]["maximum"] = vocab - 1
        if schema_name == "CompletionRequest":  # empty only with a session_id
            schema["if"] = {"properties": {"session_id": {"type": "null"}}}
            schema["then"] = {"properties": {"prompt": {"minLength": 1, "minItems": 1}}}
        for b in _branches(props.get("stop_token_ids", {})):
            if b.get("type") == "array" and vocab is not None:
                b["items"]["maximum"] = vocab - 1
        for b in _branches(props.get("logit_bias", {})):
            if b.get("type") == "object" and "patternProperties" in b:
                (value,) = b.pop("patternProperties").values()
                b["additionalProperties"] = value
                if vocab is not None:
                    b["propertyNames"] = {"pattern": int_below(vocab)}


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description="RetNet inference: OpenAI-compatible completions and chat, and sessions whose"
        " recurrent state is saved, resumed, forked, exported and imported.",
        routes=app.routes,
    )
    for _, route in flat_routes(app.routes):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        item = doc.get("paths", {}).get(route.path_format, {})
        for method in route.methods:
            op = item.get(method.lower())
            if op is not None:
                _patch_operation(route, method, op, settings)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    rt = getattr(app.state, "runtime", None)
    constrain(schemas, settings, rt.model.config.vocab_size if rt is not None else None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    schemas["Readiness"] = READY_SCHEMA
    if settings.api_keys:
        doc["components"]["securitySchemes"] = {"bearerAuth": {"type": "http", "scheme": "bearer"}}
    return doc


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """`app.openapi()` (and GET /openapi.json) serve the patched document, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build_openapi(app, settings)
        if getattr(app.state, "runtime", None) is not None:  # complete (vocabulary bounds): keep it
            app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
