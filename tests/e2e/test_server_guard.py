"""End-to-end guards of the HTTP server over real HTTP (httpx against a uvicorn subprocess).

- tenants: API keys map to tenants; another tenant's session is simply not found (404), never touched;
- limits: rate limit (429 + Retry-After), body and state-blob size limits (413), request limits (400);
- metrics: /metrics parses and its counters and histograms move;
- Redis: two servers on one Redis store continue each other's sessions with identical output.

Servers are module-scoped (each start costs seconds): one "guard" server (two tenants, memory
store) for tenants and metrics (the fuzz in test_server_fuzz.py starts its own); one "limits" server
with tiny limits; two Redis-backed servers.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.support.server import run_server
from tests.support.state import require_redis

ALICE_KEY = "key-alice-123"
BOB_KEY = "key-bob-4567"
TIMEOUT = 60.0
VOCAB = 8192  # the shipped model's vocabulary (checkpoints/retserve-small/config.json)
REDIS_STORE_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

# the limits server
LIMIT_PROMPT_TOKENS = 16
LIMIT_MAX_TOKENS = 8
LIMIT_BODY_BYTES = 4096
LIMIT_STATE_BYTES = 4096
LIMIT_KEYS = [f"key-limits-{i:02d}" for i in range(12)]  # a pool: each check spends another key's bucket
RATE_KEY = "key-limits-rate"  # only the rate-limit test uses it


# ---- helpers ---------------------------------------------------------------------------------
def error_problem(r: httpx.Response) -> str | None:
    """None if `r` carries an OpenAI error object with a non-empty message, else what is wrong."""
    try:
        body = r.json()
    except ValueError:
        return f"not JSON: {r.text[:200]!r}"
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"], dict):
        return f"not an error object: {r.text[:200]!r}"
    err = body["error"]
    if set(err) != {"message", "type", "param", "code"}:
        return f"error object keys are {sorted(err)}, not message/type/param/code"
    if not isinstance(err["message"], str) or not err["message"].strip():
        return f"empty or non-string message: {err['message']!r}"
    if not isinstance(err["type"], str) or not err["type"]:
        return f"empty or non-string type: {err['type']!r}"
    if err["param"] is not None and not isinstance(err["param"], str):
        return f"param is {err['param']!r}"
    if err["code"] is not None and not isinstance(err["code"], str):
        return f"code is {err['code']!r}"
    return None


def describe(r: httpx.Response) -> str:
    req = r.request
    body = req.content[:200] if req.content else b""
    return f"{req.method} {str(req.url)[:200]} body={body!r} -> {r.status_code} {r.text[:300]!r}"


def expect_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """Assert `r` is an error with `status` (and `code`); return its error object."""
    assert r.status_code == status, describe(r)
    problem = error_problem(r)
    assert problem is None, f"{problem}: {describe(r)}"
    err = r.json()["error"]
    if code is not None:
        assert err["code"] == code, describe(r)
    return err


def expect_ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, describe(r)
    return r.json()


def client(url: str, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=TIMEOUT)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def scrape(url: str) -> tuple[set[str], dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    """(family names, {(sample name, sorted labels): value}) of GET /metrics."""
    r = httpx.get(url + "/metrics", timeout=TIMEOUT)
    assert r.status_code == 200, describe(r)
    families, samples = set(), {}
    for fam in text_string_to_metric_families(r.text):
        families.add(fam.name)
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def sample(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


# ---- servers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guard_url() -> Iterator[str]:
    env = {
        "RETSERVE_API_KEYS": json.dumps({ALICE_KEY: "alice", BOB_KEY: "bob"}),
        "RETSERVE_RATE_LIMIT_PER_S": "1000",
        "RETSERVE_RATE_LIMIT_BURST": "1000",
    }
    with run_server(env) as url:
        yield url


@pytest.fixture(scope="module")
def alice(guard_url: str) -> Iterator[httpx.Client]:
    with client(guard_url, ALICE_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def bob(guard_url: str) -> Iterator[httpx.Client]:
    with client(guard_url, BOB_KEY) as c:
        yield c


@pytest.fixture(scope="module")
def limits_url() -> Iterator[str]:
    env = {
        "RETSERVE_API_KEYS": json.dumps({k: "limits" for k in [*LIMIT_KEYS, RATE_KEY]}),
        "RETSERVE_RATE_LIMIT_PER_S": "1",
        "RETSERVE_RATE_LIMIT_BURST": "2",
        "RETSERVE_MAX_PROMPT_TOKENS": str(LIMIT_PROMPT_TOKENS),
        "RETSERVE_MAX_TOKENS_LIMIT": str(LIMIT_MAX_TOKENS),
        "RETSERVE_MAX_BODY_BYTES": str(LIMIT_BODY_BYTES),
        "RETSERVE_MAX_STATE_BYTES": str(LIMIT_STATE_BYTES),
    }
    with run_server(env) as url:
        yield url


class KeyPool:
    """Requests to the limits server, each with the next key of a pool (so the 1/s limit rarely bites);
    a 429 is waited out (Retry-After) and retried."""

    def __init__(self, url: str) -> None:
        self.client = client(url)
        self.keys = itertools.cycle(LIMIT_KEYS)

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        extra = kw.pop("headers", {})
        for _ in range(10):
            headers = {**extra, "Authorization": f"Bearer {next(self.keys)}"}
            r = self.client.request(method, path, headers=headers, **kw)
            if r.status_code != 429:
                return r
            time.sleep(float(r.headers.get("retry-after", "1")))
        return r

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.request("POST", path, **kw)


@pytest.fixture(scope="module")
def limited(limits_url: str) -> Iterator[KeyPool]:
    pool = KeyPool(limits_url)
    yield pool
    pool.client.close()


@pytest.fixture(scope="module")
def limits_session(limited: KeyPool) -> str:
    sid = uid("lim")
    expect_ok(limited.post("/v1/sessions", json={"session_id": sid, "prompt": "A short start."}), 201)
    return sid


# ---- 1. auth and tenants ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key-123456"},
        {"Authorization": "Bearer alice"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Basic {ALICE_KEY}"},
        {"Authorization": ALICE_KEY},
        {"Authorization": f"Bearer {ALICE_KEY}x"},
        {"Authorization": f"Bearer {ALICE_KEY[:-1]}"},
        {"X-Api-Key": ALICE_KEY},
    ],
    ids=[
        "none",
        "wrong",
        "tenant-name",
        "scheme-only",
        "basic",
        "no-scheme",
        "longer",
        "prefix",
        "other-header",
    ],
)
def test_missing_or_wrong_key_is_401(guard_url: str, headers: dict[str, str]) -> None:
    with client(guard_url) as c:
        calls = [
            c.get("/v1/models", headers=headers),
            c.get("/v1/sessions", headers=headers),
            c.get("/v1/sessions/some-session", headers=headers),
            c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, headers=headers),
            c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}]},
                headers=headers,
            ),
            c.post("/v1/sessions", json={"prompt": "Hi"}, headers=headers),
            c.put("/v1/sessions/some-session/state", content=b"\x00" * 64, headers=headers),
        ]
    for r in calls:
        err = expect_error(r, 401, code="invalid_api_key")
        assert err["type"] == "authentication_error", describe(r)
        assert r.headers.get("www-authenticate", "").lower().startswith("bearer"), describe(r)


def test_valid_keys_are_accepted(alice: httpx.Client, bob: httpx.Client) -> None:
    for c in (alice, bob):
        data = expect_ok(c.get("/v1/models"))
        assert data["object"] == "list" and data["data"], data


@pytest.fixture(scope="module")
def alice_session(alice: httpx.Client) -> str:
    sid = uid("alice")
    info = expect_ok(alice.post("/v1/sessions", json={"session_id": sid, "prompt": "some text"}), 201)
    assert info["id"] == sid and info["tokens"] > 0, info
    return sid


def test_other_tenant_cannot_see_or_touch_a_session(
    alice: httpx.Client, bob: httpx.Client, alice_session: str
) -> None:
    sid = alice_session
    before = expect_ok(alice.get(f"/v1/sessions/{sid}"))
    blob_before = alice.get(f"/v1/sessions/{sid}/state")
    assert blob_before.status_code == 200, describe(blob_before)

    attempts = [
        bob.get(f"/v1/sessions/{sid}"),
        bob.post(f"/v1/sessions/{sid}/generate", json={"prompt": " and", "max_tokens": 2}),
        bob.post("/v1/completions", json={"prompt": " and", "max_tokens": 2, "session_id": sid}),
        bob.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "session_id": sid},
        ),
        bob.post(f"/v1/sessions/{sid}/prime", json={"prompt": " more text"}),
        bob.post(f"/v1/sessions/{sid}/fork", json={"session_id": uid("bob-fork")}),
        bob.post(f"/v1/sessions/{sid}/fork"),
        bob.get(f"/v1/sessions/{sid}/state"),
        bob.delete(f"/v1/sessions/{sid}"),
    ]
    for r in attempts:
        expect_error(r, 404, code="session_not_found")

    bob_ids = [s["id"] for s in expect_ok(bob.get("/v1/sessions", params={"limit": 100}))["data"]]
    assert sid not in bob_ids
    alice_ids = [s["id"] for s in expect_ok(alice.get("/v1/sessions", params={"limit": 100}))["data"]]
    assert sid in alice_ids

    # "Import over" alice's id: import is create-or-replace within the caller's namespace, so bob can
    # at most create his own, separate session of that name (404 would be fine too); alice's is untouched.
    bob_src = uid("bob-src")
    expect_ok(
        bob.post("/v1/sessions", json={"session_id": bob_src, "prompt": "a much longer text of bob"}), 201
    )
    bob_blob = bob.get(f"/v1/sessions/{bob_src}/state")
    assert bob_blob.status_code == 200, describe(bob_blob)
    r = bob.put(f"/v1/sessions/{sid}/state", content=bob_blob.content)
    if r.status_code == 404:
        expect_error(r, 404)
    else:
        bob_copy = expect_ok(r)
        assert bob_copy["tokens"] != before["tokens"], "bob's blob must differ from alice's for this check"
        assert expect_ok(bob.get(f"/v1/sessions/{sid}"))["tokens"] == bob_copy["tokens"]
        expect_ok(bob.delete(f"/v1/sessions/{sid}"))  # deletes bob's copy only
        expect_error(bob.get(f"/v1/sessions/{sid}"), 404)
    expect_ok(bob.delete(f"/v1/sessions/{bob_src}"))

    after = expect_ok(alice.get(f"/v1/sessions/{sid}"))
    for field in ("tokens", "version", "updated_at", "size_bytes", "fingerprint"):
        assert after[field] == before[field], (field, before, after)
    blob_after = alice.get(f"/v1/sessions/{sid}/state")
    assert blob_after.status_code == 200 and blob_after.content == blob_before.content


def test_owner_can_use_the_session(alice: httpx.Client, alice_session: str) -> None:
    sid = alice_session
    info = expect_ok(alice.get(f"/v1/sessions/{sid}"))
    tokens = info["tokens"]

    body = {"prompt": " and then", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    out = expect_ok(alice.post(f"/v1/sessions/{sid}/generate", json=body))
    assert out["session_id"] == sid and out["choices"][0]["finish_reason"] == "length", out
    usage = out["usage"]
    tokens += usage["prompt_tokens"] + usage["completion_tokens"]
    assert expect_ok(alice.get(f"/v1/sessions/{sid}"))["tokens"] == tokens

    out = expect_ok(alice.post("/v1/completions", json={**body, "session_id": sid}))
    tokens += out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]
    primed = expect_ok(alice.post(f"/v1/sessions/{sid}/prime", json={"prompt": " More words here."}))
    assert primed["tokens"] > tokens, primed
    tokens = primed["tokens"]

    fork_id = uid("alice-fork")
    fork = expect_ok(alice.post(f"/v1/sessions/{sid}/fork", json={"session_id": fork_id}), 201)
    assert fork["id"] == fork_id and fork["tokens"] == tokens, fork

    blob = alice.get(f"/v1/sessions/{sid}/state")
    assert blob.status_code == 200 and len(blob.content) > 0, describe(blob)
    assert blob.headers["content-type"] == "application/octet-stream"
    imported_id = uid("alice-imported")
    imported = expect_ok(alice.put(f"/v1/sessions/{imported_id}/state", content=blob.content))
    assert imported["tokens"] == tokens, imported
    expect_ok(alice.put(f"/v1/sessions/{sid}/state", content=blob.content))  # import over her own

    for s in (fork_id, imported_id):
        deleted = expect_ok(alice.delete(f"/v1/sessions/{s}"))
        assert deleted == {"id": s, "object": "session.deleted", "deleted": True}
        expect_error(alice.get(f"/v1/sessions/{s}"), 404, code="session_not_found")
    assert expect_ok(alice.get(f"/v1/sessions/{sid}"))["tokens"] == tokens


# ---- 4. metrics (on the guard server, before the fuzz) ---------------------------------------
def test_metrics_parse_and_move(guard_url: str, alice: httpx.Client) -> None:
    _, s0 = scrape(guard_url)
    body = {"prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    outs = [expect_ok(alice.post("/v1/completions", json=body)) for _ in range(2)]
    for out in outs:
        assert out["choices"][0]["finish_reason"] == "length", out
    sid = uid("metrics")
    expect_ok(alice.post("/v1/sessions", json={"session_id": sid, "prompt": "Metrics are counted."}), 201)
    blob = alice.get(f"/v1/sessions/{sid}/state")
    assert blob.status_code == 200, describe(blob)
    families, s1 = scrape(guard_url)

    def delta(name: str, **labels: str) -> float:
        return sample(s1, name, **labels) - sample(s0, name, **labels)

    prompt_tokens = sum(o["usage"]["prompt_tokens"] for o in outs)
    completion_tokens = sum(o["usage"]["completion_tokens"] for o in outs)
    assert delta("retserve:prompt_tokens_total") >= prompt_tokens > 0
    assert delta("retserve:generation_tokens_total") >= completion_tokens == 8
    assert delta("retserve:request_success_total", finished_reason="length") >= 2
    assert delta("retserve:sessions_total", event="created") == 1
    assert delta("retserve:sessions_total", event="exported") == 1
    for hist in ("retserve:time_to_first_token_seconds", "retserve:e2e_request_latency_seconds"):
        assert hist in families, sorted(families)
        assert sample(s1, hist + "_count") > 0 and delta(hist + "_count") >= 2, hist
        assert sample(s1, hist + "_sum") > 0, hist
        assert sample(s1, hist + "_bucket", le="+Inf") == sample(s1, hist + "_count"), hist
    store = sorted(f for f in families if f.startswith("retserve:state_store"))
    assert store, f"no retserve:state_store* metrics in {sorted(families)}"
    puts = sum(
        v - s0.get(k, 0.0)
        for k, v in s1.items()
        if k[0] == "retserve:state_store_operations_total" and ("op", "put") in k[1]
    )
    assert puts >= 1, store
    expect_ok(alice.delete(f"/v1/sessions/{sid}"))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()  # NaN / Infinity literals on purpose


# ---- 2. limits -------------------------------------------------------------------------------
def test_rate_limit_is_429_with_retry_after(limits_url: str, limited: KeyPool) -> None:
    with client(limits_url, RATE_KEY) as c:
        statuses, limited_r = [], None
        for _ in range(6):
            r = c.get("/v1/models")
            statuses.append(r.status_code)
            if r.status_code == 429:
                limited_r = r
                break
        assert statuses[:2] == [200, 200], statuses
        assert limited_r is not None, f"no 429 after a burst of {len(statuses)}: {statuses}"
        err = expect_error(limited_r, 429, code="rate_limit_exceeded")
        assert err["type"] == "rate_limit_error"
        retry_after = limited_r.headers.get("retry-after")
        assert retry_after is not None and retry_after.isdigit(), limited_r.headers
        assert 1 <= int(retry_after) <= 2, retry_after
        # the bucket is per key: another key is not limited
        assert limited.request("GET", "/v1/models").status_code == 200
        time.sleep(int(retry_after))
        expect_ok(c.get("/v1/models"))


def test_json_body_over_the_limit_is_413(limited: KeyPool) -> None:
    big = {"prompt": "a" * (LIMIT_BODY_BYTES + 100), "max_tokens": 1}
    for path in ("/v1/completions", "/v1/sessions", "/v1/chat/completions"):
        expect_error(limited.post(path, json=big), 413)

    def chunked(data: bytes) -> Iterator[bytes]:  # no Content-Length: the server must count
        for i in range(0, len(data), 1000):
            yield data[i : i + 1000]

    r = limited.post(
        "/v1/completions", content=chunked(_dumps(big)), headers={"content-type": "application/json"}
    )
    expect_error(r, 413)
    # just under the limit passes the size check (and then fails the prompt-token limit)
    fits = {"prompt": "word " * ((LIMIT_BODY_BYTES - 200) // 5), "max_tokens": 1}
    assert len(_dumps(fits)) < LIMIT_BODY_BYTES
    expect_error(limited.post("/v1/completions", json=fits), 400, code="context_length_exceeded")
    ok = limited.post(
        "/v1/completions",
        content=chunked(_dumps({"prompt": "Hi", "max_tokens": 1})),
        headers={"content-type": "application/json"},
    )
    expect_ok(ok)


def test_state_blob_over_the_limit_is_413(limited: KeyPool, limits_session: str) -> None:
    real = limited.request("GET", f"/v1/sessions/{limits_session}/state")
    assert real.status_code == 200 and len(real.content) > LIMIT_STATE_BYTES, describe(real)
    sid = uid("lim-imp")
    expect_error(limited.request("PUT", f"/v1/sessions/{sid}/state", content=real.content), 413)
    expect_error(
        limited.request("PUT", f"/v1/sessions/{sid}/state", content=b"\x01" * (LIMIT_STATE_BYTES + 1)), 413
    )

    def chunked() -> Iterator[bytes]:
        for _ in range(10):
            yield b"\x02" * 1000

    expect_error(limited.request("PUT", f"/v1/sessions/{sid}/state", content=chunked()), 413)
    # under the limit: decoded (and refused as not a state), not 413
    expect_error(
        limited.request("PUT", f"/v1/sessions/{sid}/state", content=b"\x03" * 2000), 400, code="invalid_state"
    )
    expect_error(limited.request("GET", f"/v1/sessions/{sid}"), 404)


def test_max_tokens_over_the_limit_is_400(limited: KeyPool, limits_session: str) -> None:
    over = LIMIT_MAX_TOKENS + 1
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    cases = [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": over}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2**80}),
        ("/v1/chat/completions", {**chat, "max_tokens": over}),
        ("/v1/chat/completions", {**chat, "max_completion_tokens": over}),
        (f"/v1/sessions/{limits_session}/generate", {"prompt": " x", "max_tokens": over}),
    ]
    for path, body in cases:
        err = expect_error(limited.post(path, json=body), 400)
        assert err["param"] == "max_tokens", err
    out = expect_ok(
        limited.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": LIMIT_MAX_TOKENS, "ignore_eos": True}
        )
    )
    assert out["usage"]["completion_tokens"] == LIMIT_MAX_TOKENS
    out = expect_ok(
        limited.post("/v1/completions", json={"prompt": "Hi", "ignore_eos": True})
    )  # default: capped
    assert out["usage"]["completion_tokens"] <= LIMIT_MAX_TOKENS


def test_prompt_over_the_token_limit_is_400(limited: KeyPool, limits_session: str) -> None:
    long_text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen"
    too_many_ids = [5] * (LIMIT_PROMPT_TOKENS + 1)
    cases = [
        ("/v1/completions", {"prompt": long_text, "max_tokens": 1}),
        ("/v1/completions", {"prompt": too_many_ids, "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long_text}], "max_tokens": 1}),
        ("/v1/sessions", {"prompt": long_text}),
        (f"/v1/sessions/{limits_session}/prime", {"prompt": too_many_ids}),
        (f"/v1/sessions/{limits_session}/generate", {"prompt": long_text, "max_tokens": 1}),
    ]
    for path, body in cases:
        err = expect_error(limited.post(path, json=body), 400, code="context_length_exceeded")
        assert err["param"] == "prompt", err
    expect_ok(limited.post("/v1/completions", json={"prompt": [5] * LIMIT_PROMPT_TOKENS, "max_tokens": 1}))


def test_empty_prompt_is_400(limited: KeyPool, limits_session: str) -> None:
    cases = [
        ("/v1/completions", {"prompt": "", "max_tokens": 1}),
        ("/v1/completions", {"prompt": [], "max_tokens": 1}),
        ("/v1/sessions", {"prompt": ""}),
        ("/v1/sessions", {"prompt": []}),
        (f"/v1/sessions/{limits_session}/prime", {"prompt": ""}),
        # (generate with an empty prompt continues a session from its saved logits: test_server_memory)
    ]
    for path, body in cases:
        err = expect_error(limited.post(path, json=body), 400)
        assert err["param"] == "prompt" and "empty" in err["message"], err


def test_token_ids_out_of_range_are_400(limited: KeyPool, limits_session: str) -> None:
    for ids in ([VOCAB], [-1], [5, 99999], [2**80], [3, -(2**70)]):
        for path, body in (
            ("/v1/completions", {"prompt": ids, "max_tokens": 1}),
            ("/v1/sessions", {"prompt": ids}),
            (f"/v1/sessions/{limits_session}/prime", {"prompt": ids}),
        ):
            err = expect_error(limited.post(path, json=body), 400)
            assert err["param"] == "prompt", err
    # the session was not changed by any of them
    info = expect_ok(limited.request("GET", f"/v1/sessions/{limits_session}"))
    assert info["version"] == 1, info


def test_huge_top_k_is_a_400_and_does_not_stop_the_engine(limits_url: str, limited: KeyPool) -> None:
    """Runs last on the limits server: the bug it guards against leaves the engine dead."""
    r = limited.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "top_k": 2**64})
    after = limited.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    ready = httpx.get(limits_url + "/ready", timeout=TIMEOUT)
    expect_error(r, 400)
    expect_ok(after)
    assert ready.status_code == 200, ready.text


# ---- 5. two servers on one Redis -------------------------------------------------------------
@pytest.fixture(scope="module")
def redis_pair() -> Iterator[tuple[str, str]]:
    require_redis(REDIS_STORE_URL)
    env = {"RETSERVE_STORE_URL": REDIS_STORE_URL}
    with run_server(env) as first, run_server(env) as second:
        yield first, second


def _redis_keys(sid: str) -> list[bytes]:
    r = redis.Redis.from_url(REDIS_STORE_URL)
    try:
        return list(r.scan_iter(match=f"retserve:{{default:{sid}*", count=1000))
    finally:
        r.close()


def test_redis_session_continues_on_another_server(redis_pair: tuple[str, str]) -> None:
    url1, url2 = redis_pair
    sid = uid("guard-redis")
    fork_id = sid + "-fork"
    with client(url1) as s1, client(url2) as s2:
        try:
            created = expect_ok(
                s1.post(
                    "/v1/sessions", json={"session_id": sid, "prompt": "The old lighthouse keeper climbed"}
                ),
                201,
            )
            seen = expect_ok(s2.get(f"/v1/sessions/{sid}"))
            for field in ("tokens", "version", "fingerprint", "size_bytes"):
                assert seen[field] == created[field], (field, created, seen)
            expect_ok(s1.post(f"/v1/sessions/{sid}/fork", json={"session_id": fork_id}), 201)

            body = {"prompt": " the stairs and", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            on_fork = expect_ok(s1.post(f"/v1/sessions/{fork_id}/generate", json=body))
            on_orig = expect_ok(s2.post(f"/v1/sessions/{sid}/generate", json=body))
            assert on_fork["choices"][0]["text"], on_fork
            assert on_orig["choices"][0]["text"] == on_fork["choices"][0]["text"]
            assert on_orig["usage"] == on_fork["usage"]

            # and back: each continues on the other server
            body2 = {"prompt": ". Then", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            fork2 = expect_ok(s2.post(f"/v1/sessions/{fork_id}/generate", json=body2))
            orig2 = expect_ok(s1.post(f"/v1/sessions/{sid}/generate", json=body2))
            assert orig2["choices"][0]["text"] == fork2["choices"][0]["text"]
            i1 = expect_ok(s1.get(f"/v1/sessions/{sid}"))
            i2 = expect_ok(s2.get(f"/v1/sessions/{fork_id}"))
            assert (
                i1["tokens"]
                == i2["tokens"]
                == created["tokens"] + 12 + 8 + sum(o["usage"]["prompt_tokens"] for o in (on_orig, orig2))
            )
        finally:
            d1 = s2.delete(f"/v1/sessions/{sid}")
            d2 = s1.delete(f"/v1/sessions/{fork_id}")
        assert d1.status_code == 200 and d2.status_code == 200, (describe(d1), describe(d2))
        expect_error(s1.get(f"/v1/sessions/{sid}"), 404, code="session_not_found")
        expect_error(s2.get(f"/v1/sessions/{fork_id}"), 404, code="session_not_found")
    assert _redis_keys(sid) == [], "keys left in Redis after both sessions were deleted"
