"""The sessions API: create (optionally primed), get, list, delete, prime, generate, fork, export, import.

Sessions live in the caller's tenant namespace: another tenant's session is simply not found (404).
Every operation that reads or writes a session's state holds its lease (`rt.sessions.lease`); a
second concurrent one gets 409.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.convertors import Convertor, register_url_convertor

from server.deps import RuntimeDep, TenantDep
from server.dropping import request_dropping
from server.engine import EngineSamplingParams
from server.errors import APIError
from server.generation import Generation, SessionTarget, session_exists
from server.merging import merge_sessions
from server.protocol import (
    NOT_RESERVED,
    RESERVED_SESSION_IDS,
    SESSION_ID_PATTERN,
    SessionCreate,
    SessionFork,
    SessionGenerate,
    SessionMerge,
    SessionPrime,
)
from server.responses import CompletionResponse, SessionDeleted, SessionList, SessionObject, Usage
from server.routes.common import encode_prompt, final_result, usage
from server.routes.openai import serve_completion
from server.runtime import Runtime
from server.session_service import new_session_id, session_not_found, store_error
from server.session_stats import SessionStats, session_stats
from state_store import EntryInfo, Provenance, StateCodecError, StateStoreError, ValueTooLargeError


class SessionIdConvertor(Convertor[str]):
    """`{session_id:sid}`: any path segment but the reserved ones, so /v1/sessions/merge is only the
    merge endpoint (no GET/DELETE of a session "merge", which cannot be created)."""

    regex = "(?!(?:" + "|".join(RESERVED_SESSION_IDS) + ")(?:/|$))[^/]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("sid", SessionIdConvertor())
router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
SidPath = Annotated[
    str, Path(pattern=SESSION_ID_PATTERN, description="session id", json_schema_extra=NOT_RESERVED)
]


def session_json(rt: Runtime, info: EntryInfo) -> SessionObject:
    m = info.meta
    return SessionObject(
        id=info.session,
        tokens=m.positions[0] if m.positions else 0,
        size_bytes=info.size,
        version=info.version,
        model=rt.model_name,
        fingerprint=m.fingerprint,
        dtype=m.dtype,
        created_at=m.created_at,
        updated_at=m.updated_at,
        expires_in=info.expires_in,
        provenance=m.provenance.to_json(),
    )


async def _info(rt: Runtime, tenant: str, sid: str) -> SessionObject:
    return session_json(rt, await rt.sessions.info(tenant, sid))


def _digest(ids: list[int]) -> str:
    return "blake2b:" + hashlib.blake2b(repr(ids).encode(), digest_size=16).hexdigest()


async def _read(
    rt: Runtime, request: Request, target: SessionTarget, ids: list[int], body: SessionCreate | SessionPrime
) -> Usage | None:
    """Read `ids` into the session's state (max_tokens=0, with the body's token dropping) and save it,
    with its next-token logits, under its lease; the read's usage if it dropped tokens (the response
    reports it), else None.

    A client that disconnects first aborts the read: the session stays as it was."""
    dropping = request_dropping(body, rt.settings.token_dropping, rt.model.config)
    params = EngineSamplingParams(temperature=0, max_tokens=0)
    gen = Generation(rt, ids, params, target, dropping, text=isinstance(body.prompt, str))
    await gen.start()
    _, out = await final_result(gen, request)
    return usage(out, gen) if dropping is not None else None


@router.post("", status_code=201)
async def create_session(
    body: SessionCreate, request: Request, rt: RuntimeDep, tenant: TenantDep
) -> SessionObject:
    sid = body.session_id or new_session_id()
    ids = await encode_prompt(rt, body.prompt) if body.prompt is not None else []
    read: Usage | None = None
    if ids:
        target = SessionTarget(tenant, sid, create=True, provenance=Provenance(primed_from=_digest(ids)))
        read = await _read(rt, request, target, ids, body)
        rt.metrics.sessions.labels(event="primed").inc()
    else:
        async with rt.sessions.lease(tenant, sid) as lease:
            if await rt.sessions.load(tenant, sid, must_exist=False) is not None:
                raise session_exists(sid)
            await rt.sessions.save(tenant, sid, rt.model.empty_state(1), lease=lease, create=True)
    rt.metrics.sessions.labels(event="created").inc()
    return (await _info(rt, tenant, sid)).model_copy(update={"usage": read})


@router.get("")
async def list_sessions(
    rt: RuntimeDep,
    tenant: TenantDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=4096)] = None,
) -> SessionList:
    try:
        page = await rt.store.list(tenant, cursor=cursor, limit=limit)
        data = []
        for sid in page.sessions:
            info = await rt.states.info(tenant, sid)
            if info is not None:  # expired between the scan and now
                data.append(session_json(rt, info))
    except StateStoreError as e:
        if isinstance(e, ValueError):
            raise APIError(400, f"cursor: {e}", param="cursor") from None
        raise store_error(e, "listing sessions") from None
    return SessionList(data=data, next_cursor=page.cursor, has_more=page.cursor is not None)


@router.get("/{session_id:sid}")
async def get_session(session_id: SidPath, rt: RuntimeDep, tenant: TenantDep) -> SessionObject:
    return await _info(rt, tenant, session_id)


@router.delete("/{session_id:sid}")
async def delete_session(session_id: SidPath, rt: RuntimeDep, tenant: TenantDep) -> SessionDeleted:
    async with rt.sessions.lease(tenant, session_id) as lease:
        try:
            deleted = await rt.store.delete(tenant, session_id, lease=lease)
        except StateStoreError as e:
            raise store_error(e, f"deleting session {session_id!r}") from None
    if not deleted:
        raise session_not_found(session_id)
    rt.metrics.sessions.labels(event="deleted").inc()
    return SessionDeleted(id=session_id)


@router.post("/{session_id:sid}/prime")
async def prime_session(
    session_id: SidPath, body: SessionPrime, request: Request, rt: RuntimeDep, tenant: TenantDep
) -> SessionObject:
    ids = await encode_prompt(rt, body.prompt)
    read = await _read(rt, request, SessionTarget(tenant, session_id), ids, body)
    rt.metrics.sessions.labels(event="primed").inc()
    return (await _info(rt, tenant, session_id)).model_copy(update={"usage": read})


@router.post("/merge", status_code=201)
async def merge(body: SessionMerge, rt: RuntimeDep, tenant: TenantDep) -> SessionObject:
    """A new session from the states of others (concat or a weighted average); the sources stay as
    they are. See server/merging.py."""
    new_id = await merge_sessions(rt, tenant, body)
    return await _info(rt, tenant, new_id)


@router.post("/{session_id:sid}/generate", response_model=CompletionResponse)
async def generate(
    session_id: SidPath, body: SessionGenerate, request: Request, rt: RuntimeDep, tenant: TenantDep
):
    """A completion (OpenAI completions format, streaming or not) continuing the session."""
    if body.session_id is not None and body.session_id != session_id:
        raise APIError(400, "session_id in the body differs from the one in the path", param="session_id")
    return await serve_completion(body, request, rt, tenant, session_id)


@router.post("/{session_id:sid}/fork", status_code=201)
async def fork_session(
    session_id: SidPath, rt: RuntimeDep, tenant: TenantDep, body: SessionFork | None = None
) -> SessionObject:
    new_id = (body.session_id if body else None) or new_session_id()
    if new_id == session_id:
        raise APIError(400, "a fork needs a different session_id than its source", param="session_id")
    async with rt.sessions.lease(tenant, session_id):
        src = await rt.sessions.load(tenant, session_id)
        assert src is not None
        logits = None if src.logits is None else src.logits[0]  # (1, V) -> (V,)
        # a new session (409 if the id is taken), written without a lease of its own
        await rt.sessions.save(tenant, new_id, src.state, lease=None, base=src, create=True, logits=logits)
    rt.metrics.sessions.labels(event="forked").inc()
    return await _info(rt, tenant, new_id)


@router.get("/{session_id:sid}/stats")
async def get_stats(session_id: SidPath, rt: RuntimeDep, tenant: TenantDep) -> SessionStats:
    """The session's memory: tokens read, state size, per-(layer, head) state norms (a saved snapshot:
    no lease, so it never waits for or blocks a running request)."""
    loaded = await rt.sessions.load(tenant, session_id)
    assert loaded is not None  # must_exist: 404 otherwise
    return await session_stats(session_id, loaded)


@router.get("/{session_id:sid}/state")
async def export_state(session_id: SidPath, rt: RuntimeDep, tenant: TenantDep) -> Response:
    async with rt.sessions.lease(tenant, session_id):
        try:
            stored = await rt.store.get(tenant, session_id)
        except StateStoreError as e:
            raise store_error(e, f"exporting session {session_id!r}") from None
    if stored is None:
        raise session_not_found(session_id)
    rt.metrics.sessions.labels(event="exported").inc()
    rt.metrics.state_bytes.observe(len(stored.data))
    return Response(
        stored.data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{session_id}.rstate"',
            "X-Retserve-Session-Version": str(stored.info.version),
            "X-Retserve-Fingerprint": stored.info.meta.fingerprint,
        },
    )


@router.put("/{session_id:sid}/state")
async def import_state(
    session_id: SidPath, request: Request, rt: RuntimeDep, tenant: TenantDep
) -> SessionObject:
    """Import a blob exported by GET .../state (any server of the same checkpoint); fully validated."""
    data = await request.body()  # bounded by RETSERVE_MAX_STATE_BYTES (app.BodyLimit)
    if not data:
        raise APIError(400, "empty body: send the bytes of an exported state (application/octet-stream)")
    try:
        decoded = await rt.states.decode(data)
    except StateCodecError as e:
        raise APIError(400, f"not a valid state for this model: {e}", code="invalid_state") from None
    if decoded.meta.batch_size != 1:
        raise APIError(
            400, f"a session state has one row; this blob has {decoded.meta.batch_size}", code="invalid_state"
        )
    async with rt.sessions.lease(tenant, session_id) as lease:
        try:
            await rt.store.put(tenant, session_id, bytes(data), ttl=rt.settings.session_ttl_s, lease=lease)
        except ValueTooLargeError as e:
            raise APIError(413, f"the state store refuses this blob: {e}") from None
        except StateStoreError as e:
            raise store_error(e, f"importing session {session_id!r}") from None
    rt.metrics.sessions.labels(event="imported").inc()
    rt.metrics.state_bytes.observe(len(data))
    return await _info(rt, tenant, session_id)
