"""retserve-client (clients/python) against real servers (uvicorn subprocesses, shipped model):

every method, sync and async; streamed text == non-streamed greedy text; typed errors (400, 401, 404,
409, 413, 429); retries that wait at least the server's Retry-After; export/import round trip.
The client is the copy installed in the venv (`pip install -e ./clients/python`, done by `make install`).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from retserve_client import (
    APIConnectionError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    BadRequest,
    Client,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RetserveError,
    ServerError,
    SessionBusy,
    Unavailable,
)
from retserve_client.errors import from_stream_event, parse_retry_after
from retserve_client.sse import SSEParser

from tests.support.server import run_server
from tests.support.state import free_port

GREEDY = {"temperature": 0, "max_tokens": 8}
DOC = "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail about."
MORE = " It is a way I have of driving off the spleen and regulating the circulation."
DROP = {"policy": "decayed", "keep": 0.5, "sinks": 1, "recent": 1}
MAX_BODY = 2048
RATE_KEY, KEY_B, KEY_C = "key-rate-limited-0001", "key-tenant-b-00000002", "key-tenant-c-00000003"
KEYS = {RATE_KEY: "a", KEY_B: "b", KEY_C: "c"}
BURST = 3
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Tell me a story."}]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with run_server({"RETSERVE_MAX_BODY_BYTES": str(MAX_BODY)}) as u:
        yield u


@pytest.fixture(scope="module")
def keyed_url() -> Iterator[str]:
    env = {
        "RETSERVE_API_KEYS": json.dumps(KEYS),
        "RETSERVE_RATE_LIMIT_PER_S": "0.5",
        "RETSERVE_RATE_LIMIT_BURST": str(BURST),
    }
    with run_server(env) as u:
        yield u


@pytest.fixture
def client(url: str) -> Iterator[Client]:
    with Client(url, timeout=60.0) as c:
        yield c


def arun(coro):
    return asyncio.run(coro)


# ---- OpenAI-compatible calls ----------------------------------------------------------------------


def test_health_and_models(client: Client, url: str) -> None:
    assert client.health() == {"status": "ok"}
    (model,) = client.models()
    assert model.id == "retserve-small" and model.owned_by == "retserve"

    async def run() -> None:
        async with AsyncClient(url) as ac:
            assert await ac.health() == {"status": "ok"}
            assert [m.id for m in await ac.models()] == [model.id]

    arun(run())


def test_completion_streamed_equals_plain(client: Client) -> None:
    plain = client.completions(DOC, **GREEDY)
    assert plain.text and plain.finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == 8
    assert plain.usage.dropped_tokens is None
    chunks = list(client.completions(DOC, stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.text for c in chunks) == plain.text
    assert chunks[-1].usage == plain.usage
    assert any(c.finish_reason == "length" for c in chunks)
    with client.completions(DOC, stream=True, **GREEDY) as s:
        assert s.text() == plain.text
    with pytest.raises(RetserveError, match="already iterated"):
        s.text()
    ids = client.completions([1, 2, 3, 4], **GREEDY)  # token ids as the prompt
    assert ids.usage is not None and ids.usage.prompt_tokens == 4


def test_completion_async_equals_sync(client: Client, url: str) -> None:
    want = client.completions(DOC, **GREEDY).text

    async def run() -> tuple[str, str]:
        async with AsyncClient(url) as ac:
            plain = (await ac.completions(DOC, **GREEDY)).text
            stream = await ac.completions(DOC, stream=True, **GREEDY)
            return plain, "".join([c.text async for c in stream])

    assert arun(run()) == (want, want)


def test_chat_streamed_equals_plain(client: Client, url: str) -> None:
    plain = client.chat(MESSAGES, **GREEDY)
    assert plain.text and plain.usage is not None
    assert "".join(c.text for c in client.chat(MESSAGES, stream=True, **GREEDY)) == plain.text

    async def run() -> tuple[str, str]:
        async with AsyncClient(url) as ac:
            a = (await ac.chat(MESSAGES, **GREEDY)).text
            async with await ac.chat(MESSAGES, stream=True, **GREEDY) as s:
                return a, await s.text()

    assert arun(run()) == (plain.text, plain.text)


def test_token_dropping_reports_dropped_tokens(client: Client) -> None:
    out = client.completions(DOC, token_dropping=DROP, **GREEDY)
    assert out.usage is not None and out.usage.dropped_tokens and out.usage.dropped_tokens > 0
    s = client.create_session(prompt=DOC, token_dropping=DROP)
    assert s.usage is not None and s.usage.dropped_tokens == out.usage.dropped_tokens
    primed = client.prime(s.id, MORE, token_dropping=DROP)
    assert primed.usage is not None and primed.usage.dropped_tokens and primed.tokens > s.tokens


# ---- sessions --------------------------------------------------------------------------------------


def test_sessions_sync(client: Client, tmp_path: Path) -> None:
    s = client.create_session("sync-doc", prompt=DOC)
    assert s.id == "sync-doc" and s.tokens > 0 and s.size_bytes > 0 and "primed_from" in s.provenance
    primed = client.prime(s.id, MORE)
    assert primed.tokens > s.tokens and primed.version > s.version
    assert client.get_session(s.id).tokens == primed.tokens

    # continuing from the saved logits, plain and streamed, equals a stateless completion of the text
    want = client.completions(DOC + MORE, **GREEDY).text
    a, b = client.fork(s.id, "sync-a"), client.fork(s.id)
    assert a.id == "sync-a" and b.id not in (s.id, a.id) and a.tokens == primed.tokens
    assert client.generate(a.id, **GREEDY).text == want
    assert "".join(c.text for c in client.generate(b.id, stream=True, **GREEDY)) == want
    assert client.get_session(a.id).tokens == primed.tokens + 8
    out = client.generate(a.id, " And then", **GREEDY)
    assert out.session_id == a.id and out.usage is not None and out.usage.prompt_tokens > 0

    other = client.create_session("sync-other", prompt=MORE)
    merged = client.merge([s.id, other.id], session_id="sync-merged")
    assert merged.provenance["merged_from"] == [s.id, other.id]
    assert merged.tokens == primed.tokens + other.tokens  # positions add up
    avg = client.merge([s.id, other.id], mode="average", weights=[0.25, 0.75])
    assert avg.provenance["merge_mode"] == "average"

    # export (to bytes and to a file), import under a new id, re-export: the same bytes
    path = tmp_path / "doc.rstate"
    blob = client.export_state(s.id, path)
    assert path.read_bytes() == blob and len(blob) > 0
    imported = client.import_state("sync-imported", path)
    assert imported.tokens == primed.tokens
    assert client.import_state("sync-imported-2", blob).fingerprint == imported.fingerprint
    assert client.export_state("sync-imported") == blob
    assert client.generate("sync-imported", **GREEDY).text == want

    ids = {x.id for x in client.list_sessions(page_size=2)}  # several pages
    assert {s.id, a.id, b.id, other.id, merged.id, avg.id, "sync-imported"} <= ids
    page = client.list_sessions_page(limit=1)
    assert len(page.data) == 1 and page.has_more and page.next_cursor
    assert client.delete_session("sync-imported-2") is True
    with pytest.raises(NotFound):
        client.get_session("sync-imported-2")
    with pytest.raises(NotFound):
        client.session_stats("sync-imported-2")


def test_session_stats(client: Client, url: str) -> None:
    s = client.create_session("stats-doc", prompt=DOC)
    st = client.session_stats(s.id)
    assert (st.id, st.tokens) == (s.id, s.tokens) and st.state_bytes > 0
    assert st.raw["object"] == "session.stats"
    assert len(st.state_norms) == st.num_layers and {len(h) for h in st.state_norms} == {st.num_heads}
    assert all(v > 0 for layer in st.state_norms for v in layer)
    empty = client.session_stats(client.create_session("stats-empty").id)
    assert empty.tokens == 0 and empty.state_bytes == st.state_bytes  # a fixed size, whatever was read
    assert all(v == 0 for layer in empty.state_norms for v in layer)

    async def run() -> None:
        async with AsyncClient(url) as ac:
            assert (await ac.session_stats(s.id)).state_norms == st.state_norms

    arun(run())


def test_sessions_async(client: Client, url: str, tmp_path: Path) -> None:
    want = client.completions(DOC + MORE, **GREEDY).text

    async def run() -> None:
        async with AsyncClient(url) as ac:
            s = await ac.create_session("async-doc", prompt=DOC)
            primed = await ac.prime(s.id, MORE)
            assert primed.tokens > s.tokens
            assert (await ac.get_session(s.id)).tokens == primed.tokens
            a, b = await ac.fork(s.id, "async-a"), await ac.fork(s.id)
            assert (await ac.generate(a.id, **GREEDY)).text == want
            stream = await ac.generate(b.id, "", stream=True, **GREEDY)
            assert "".join([c.text async for c in stream]) == want
            other = await ac.create_session(prompt=MORE)
            merged = await ac.merge([s.id, other.id], "concat", None, "async-merged")
            assert merged.provenance["merged_from"] == [s.id, other.id]
            blob = await ac.export_state(s.id, tmp_path / "a.rstate")
            await ac.import_state("async-imported", blob)
            assert await ac.export_state("async-imported") == (tmp_path / "a.rstate").read_bytes() == blob
            ids = {x.id async for x in ac.list_sessions(page_size=2)}
            assert {s.id, a.id, b.id, other.id, merged.id, "async-imported"} <= ids
            assert await ac.delete_session("async-imported") is True
            with pytest.raises(NotFound):
                await ac.delete_session("async-imported")
            with pytest.raises(SessionBusy) as e:
                await ac.create_session(s.id)
            assert e.value.status == 409

    arun(run())


# ---- typed errors ----------------------------------------------------------------------------------


def test_errors_are_typed(client: Client) -> None:
    with pytest.raises(NotFound) as nf:
        client.get_session("no-such-session")
    assert nf.value.status == 404 and "no-such-session" in nf.value.message
    with pytest.raises(NotFound):
        client.generate("no-such-session", "hi", stream=True, **GREEDY)  # raised by the call, not later
    with pytest.raises(BadRequest) as bad:
        client.completions(DOC, temperature="hot")
    assert bad.value.status == 400 and bad.value.param == "temperature"
    with pytest.raises(BadRequest) as bad:
        client.merge(["only-one"])
    assert bad.value.param == "sources"
    client.create_session("taken")
    with pytest.raises(SessionBusy) as busy:
        client.create_session("taken")
    assert busy.value.status == 409
    client.fork("taken", "taken-copy")
    with pytest.raises(SessionBusy):
        client.fork("taken", "taken-copy")  # the copy's id exists
    with pytest.raises(PayloadTooLarge) as big:
        client.completions("x" * (MAX_BODY + 100), **GREEDY)
    assert big.value.status == 413
    with pytest.raises(BadRequest) as bad_state:
        client.import_state("garbage", b"not a state")
    assert bad_state.value.code == "invalid_state"
    empty = client.create_session()
    with pytest.raises(BadRequest) as needs_prompt:
        client.generate(empty.id, **GREEDY)  # nothing read: no saved logits
    assert needs_prompt.value.code == "prompt_required"


def test_errors_are_typed_async(url: str) -> None:
    async def run() -> None:
        async with AsyncClient(url) as ac:
            with pytest.raises(NotFound):
                await ac.get_session("no-such-async")
            with pytest.raises(BadRequest):
                await ac.chat([{"role": "robot", "content": "hi"}])
            with pytest.raises(PayloadTooLarge):
                await ac.chat([{"role": "user", "content": "x" * (MAX_BODY + 100)}])

    arun(run())


def test_auth_and_tenants(keyed_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETSERVE_API_KEY", raising=False)
    with Client(keyed_url) as anon, pytest.raises(AuthenticationError) as e:
        anon.models()
    assert e.value.status == 401 and e.value.code == "invalid_api_key"
    with Client(keyed_url, api_key="not-a-key-at-all") as wrong, pytest.raises(AuthenticationError):
        wrong.create_session()
    monkeypatch.setenv("RETSERVE_API_KEY", KEY_B)
    monkeypatch.setenv("RETSERVE_URL", keyed_url)
    with Client() as b:  # URL and key from the environment
        s = b.create_session(prompt=DOC)
        assert b.get_session(s.id).tokens == s.tokens
    with Client(keyed_url, api_key=KEY_C) as c, pytest.raises(NotFound):
        c.get_session(s.id)  # another tenant's session

    async def run() -> None:
        async with AsyncClient(keyed_url, api_key="") as ac:  # "" = no key
            with pytest.raises(AuthenticationError):
                await ac.list_sessions_page()

    monkeypatch.delenv("RETSERVE_API_KEY")
    arun(run())


def _exhaust(c: Client) -> RateLimited:
    """Spend the key's burst; the first 429."""
    for _ in range(BURST + 2):
        try:
            c.models()
        except RateLimited as e:
            return e
    raise AssertionError("no 429 after the burst")


def test_rate_limit_retry_waits_retry_after(keyed_url: str) -> None:
    retries: list[tuple[int, float, RetserveError]] = []
    with Client(keyed_url, api_key=RATE_KEY, max_retries=0) as strict:
        limited = _exhaust(strict)
        assert limited.status == 429 and limited.retry_after is not None and limited.retry_after >= 1
        hook = {"on_retry": lambda *a: retries.append(a)}
        with Client(keyed_url, api_key=RATE_KEY, **hook) as c, pytest.raises(RateLimited):
            c.completions(DOC)  # a POST is not retried by default
        assert retries == []
        with Client(keyed_url, api_key=RATE_KEY, max_backoff_s=0.5, **hook) as c, pytest.raises(RateLimited):
            c.models()  # Retry-After (>= 1 s) is over max_backoff_s: raised, not waited
        assert retries == []
    with Client(keyed_url, api_key=RATE_KEY, max_retries=3, on_retry=lambda *a: retries.append(a)) as c:
        t0 = time.monotonic()
        assert c.models()[0].id == "retserve-small"  # a GET: retried after the wait
        elapsed = time.monotonic() - t0
    assert retries, "the 429 was not retried"
    attempt, delay, err = retries[0]
    assert attempt == 1 and isinstance(err, RateLimited) and err.retry_after is not None
    assert delay >= err.retry_after and elapsed >= err.retry_after

    async def run() -> tuple[float, list]:
        seen: list = []
        async with AsyncClient(keyed_url, api_key=RATE_KEY, max_retries=0) as ac:
            with pytest.raises(RateLimited):
                for _ in range(BURST + 2):
                    await ac.models()
        async with AsyncClient(
            keyed_url,
            api_key=RATE_KEY,
            max_retries=3,
            retry_non_idempotent=True,
            on_retry=lambda *a: seen.append(a),
        ) as ac:
            t0 = time.monotonic()
            s = await ac.create_session(prompt=DOC)  # a POST, retried because asked to
            assert s.tokens > 0
            return time.monotonic() - t0, seen

    elapsed, seen = arun(run())
    assert seen and elapsed >= seen[0][2].retry_after and seen[0][1] >= seen[0][2].retry_after


# ---- without a server ------------------------------------------------------------------------------


def test_connection_errors_and_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()  # nothing listens there
    retries: list = []
    with Client(
        f"http://127.0.0.1:{port}", max_retries=1, backoff_s=0.01, on_retry=lambda *a: retries.append(a)
    ) as c:
        with pytest.raises(APIConnectionError):
            c.health()
        assert len(retries) == 1  # a GET whose connection failed is retried
        with pytest.raises(TypeError):
            c.merge("ab")  # one string, not a list of ids
        with pytest.raises(TypeError):
            c.import_state("x", 42)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            c.get_session("")
        with pytest.raises(TypeError):
            c.completions("hi", prompt="again")
    with pytest.raises(ValueError):
        Client("127.0.0.1:8000")
    with pytest.raises(ValueError):
        Client(max_retries=-1)
    monkeypatch.setenv("RETSERVE_URL", "http://example.invalid:1/")
    assert Client().config.base_url == "http://example.invalid:1"
    monkeypatch.delenv("RETSERVE_URL")
    assert Client().config.base_url == "http://127.0.0.1:8000"


def test_timeout_is_typed_and_not_retried() -> None:
    with socket.socket() as listener:  # accepts connections (the kernel's backlog), never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        retries: list = []
        with Client(f"http://127.0.0.1:{port}", timeout=0.3, on_retry=lambda *a: retries.append(a)) as c:
            t0 = time.monotonic()
            with pytest.raises(APITimeoutError, match="timed out"):
                c.health()
            assert time.monotonic() - t0 < 5 and retries == []


def test_sse_parser_and_error_mapping() -> None:
    p = SSEParser()
    events = [
        p.feed(line)
        for line in [": comment", 'data: {"a": 1}', "", "data: x", "data:y", "\r", "data: [DONE]"]
    ]
    assert [e for e in events if e is not None] == ['{"a": 1}', "x\ny"]
    assert p.flush() == "[DONE]" and p.flush() is None
    assert isinstance(
        from_stream_event({"message": "m", "type": "server_error", "code": "engine_error"}), ServerError
    )
    err = from_stream_event({"message": "m", "type": "service_unavailable_error", "code": "aborted"})
    assert isinstance(err, Unavailable) and err.status == 503 and err.code == "aborted"
    assert (
        parse_retry_after("3") == 3.0
        and parse_retry_after(None) is None
        and parse_retry_after("soon") is None
    )
    assert 0 <= (parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") or 0.0) == 0.0
