"""Fuzz the HTTP server (httpx against a uvicorn subprocess): a seeded stream of malformed requests
to every endpoint never gets a 5xx, every 4xx is an OpenAI error object, and the server still serves
a normal completion afterwards."""

from __future__ import annotations

import math
import random
from typing import Any

import httpx

from tests.e2e.test_server_guard import (  # noqa: F401 - fixtures are used by name
    TIMEOUT,
    VOCAB,
    _dumps,
    alice,
    client,
    describe,
    error_problem,
    expect_error,
    expect_ok,
    guard_url,
    uid,
)

ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**31,
    2**63,
    2**64,
    2**80,
    -(2**80),
    10**30,
    1e308,
    -1e308,
    5e-324,
    0.5,
    -0.0,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "abc",
    "12",
    "NaN",
    "x" * 3000,
    "ünïcödé 日本語 🙂 \u202e",
    "\u0000\ud800\udfff",
    [],
    [1, 2],
    ["a", 3],
    [[1]],
    [2**80],
    [-1],
    [VOCAB],
    [0.5],
    {},
    {"a": {"b": [1, {"c": None}]}},
]
# every field any request model knows, plus unknown ones
FIELDS = [
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "user",
    "session_id",
    "top_k",
    "min_p",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
    "prompt",
    "messages",
    "ttl_s",
    "bogus",
    "",
    "x" * 300,
]
# the values the systematic sweep puts in every sampling field of /v1/completions
SWEEP_VALUES: list[Any] = [
    None,
    True,
    -1,
    2**63,
    2**80,
    -(2**80),
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    "abc",
    [1, 2],
    {"a": {}},
    "x" * 3000,
]
SWEEP_FIELDS = [f for f in FIELDS[:23] if f not in ("messages", "top_logprobs", "max_completion_tokens")]
ODD_IDS = [
    "x" * 129,
    "x" * 5000,
    "ü",
    "a b",
    "%00",
    "nosuch",
    "-",
    "a" * 128,
    "..",
    "a.b@c+d=e~f",
    "sess_" + "A" * 32,
]
ODD_QUERIES = [
    "limit=-1",
    "limit=0",
    "limit=abc",
    "limit=1e3",
    "limit=101",
    "limit=",
    f"limit={2**80}",
    "limit=1&limit=2",
    "limit=NaN",
    "cursor=garbage",
    "cursor=",
    "cursor=%00",
    "cursor=0",
    "cursor=-1",
    "cursor=" + "c" * 5000,
    "cursor=%FF%FE",
    "cursor=%7B%22a%22%3A1%7D",
    "foo=bar",
    "limit=5&cursor=garbage&extra=%F0%9F%99%82",
]


def _malformed(rng: random.Random, valid: bytes) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:
        return valid[: rng.randrange(1, max(2, len(valid)))]  # truncated
    if kind == 1:
        return valid + rng.choice([b"}", b",", b"garbage", b"\x00", b" {}"])
    if kind == 2:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 3:
        return valid.replace(b'"', b"'")
    if kind == 4:
        depth = rng.choice([100, 1000, 5000])
        return b"[" * depth + b"]" * depth
    if kind == 5:
        return b'{"prompt": "\xff\xfe invalid utf-8"}'
    if kind == 6:
        return rng.choice([b"{", b"}", b"[", b'{"a":}', b"{,}", b'{"prompt" "x"}', b"nul", b"tru", b"-"])
    if kind == 7:
        return b'{"prompt": "a", "prompt": 5}'  # duplicate key
    return b'{"prompt": "\\ud800\\udc00\\udc00 \\u0000"}'


def _mutate(rng: random.Random, base: dict[str, Any]) -> tuple[bytes, str]:
    """A mutated JSON body (bytes, description)."""
    kind = rng.choices(
        ["malformed", "types", "unknown", "remove", "nonobject", "empty", "valid"], [3, 6, 1, 1, 1, 1, 1]
    )[0]
    valid = _dumps(base)
    if kind == "malformed":
        return _malformed(rng, valid), kind
    if kind == "empty":
        return b"", kind
    if kind == "nonobject":
        return _dumps(rng.choice(ODD_VALUES)), kind
    body = dict(base)
    if kind == "types":
        for _ in range(rng.randint(1, 3)):
            field = rng.choice([*FIELDS, *base]) if rng.random() < 0.7 else rng.choice(list(base) or FIELDS)
            body[field] = rng.choice(ODD_VALUES)
    elif kind == "unknown":
        body[rng.choice(["bogus", "functions", "tools", "best_of", "echo", "suffix"])] = rng.choice(
            ODD_VALUES
        )
    elif kind == "remove" and body:
        body.pop(rng.choice(list(body)))
    return _dumps(body), kind


def _state_blob(rng: random.Random, real: bytes) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
    if kind == 1:
        return real[: rng.randrange(1, len(real))]  # truncated
    if kind in (2, 3):  # a few flipped bytes anywhere (kind 3: in the header region)
        b = bytearray(real)
        end = len(real) if kind == 2 else min(len(real), 2000)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(end)
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 4:
        return real + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    if kind == 5:
        return rng.choice([b"\x00" * 8, b"\xff" * 8, (2**64 - 1).to_bytes(8, "little"), b"{}", b"RSTATE"])
    if kind == 6:
        n = int.from_bytes(real[:8], "little")
        return rng.randrange(n - 50, n + 50).to_bytes(8, "little") + real[8:]  # wrong header length
    return real


def test_fuzz_never_5xx_and_errors_are_openai_objects(guard_url: str, alice: httpx.Client) -> None:  # noqa: F811
    rng = random.Random(20240611)
    base_sid = "fuzz-base"
    expect_ok(
        alice.post("/v1/sessions", json={"session_id": base_sid, "prompt": "Fuzzing begins here."}), 201
    )
    real_blob = alice.get(f"/v1/sessions/{base_sid}/state").content
    assert len(real_blob) > 1000

    failures: list[str] = []
    counts: dict[int, int] = {}

    def check(r: httpx.Response, what: str) -> None:
        counts[r.status_code] = counts.get(r.status_code, 0) + 1
        if r.status_code >= 500:
            failures.append(f"[{what}] 5xx: {describe(r)}")
        elif r.status_code >= 400:
            problem = error_problem(r)
            if problem is not None:
                failures.append(f"[{what}] {problem}: {describe(r)}")

    def send(
        method: str, path: str, what: str, content: bytes | None = None, bad_keys: bool = True, **kw: Any
    ) -> httpx.Response | None:
        headers = kw.pop("headers", {})
        if content is not None and "content-type" not in headers:
            headers["content-type"] = "application/json"
        if (
            bad_keys and rng.random() < 0.05
        ):  # now and then a bad key: the answer must still be an error object
            headers["Authorization"] = rng.choice(["Bearer nope-nope-nope", "Basic abc", "Bearer"])
        try:
            r = alice.request(method, path, content=content, headers=headers, **kw)
        except httpx.HTTPError as e:
            failures.append(f"[{what}] {method} {path[:100]}: transport error {e!r}")
            return None
        check(r, what)
        return r

    def some_sid() -> str:
        return base_sid if rng.random() < 0.7 else rng.choice(ODD_IDS)

    endpoints = [
        ("POST", lambda: "/v1/completions", {"prompt": "Hello", "max_tokens": 2}),
        (
            "POST",
            lambda: "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        ),
        ("POST", lambda: "/v1/sessions", {"prompt": "Hello"}),
        ("POST", lambda: f"/v1/sessions/{some_sid()}/prime", {"prompt": " more"}),
        ("POST", lambda: f"/v1/sessions/{some_sid()}/generate", {"prompt": " and", "max_tokens": 2}),
        (
            "POST",
            lambda: f"/v1/sessions/{some_sid()}/fork",
            {"session_id": "fuzz-fork"},  # made unique per request below
        ),
    ]

    # phase 1: seeded random mutations of every endpoint
    for i in range(260):
        roll = rng.random()
        if roll < 0.62:
            method, path, base = rng.choice(endpoints)
            if base.get("session_id") == "fuzz-fork":
                base = {"session_id": f"fuzz-fork-{i}"}
            content, kind = _mutate(rng, base)
            send(method, path(), f"{i} {kind}", content)
        elif roll < 0.80:
            sid = f"fuzz-imp-{i}" if rng.random() < 0.8 else rng.choice(ODD_IDS)
            blob = _state_blob(rng, real_blob)
            r = send(
                "PUT",
                f"/v1/sessions/{sid}/state",
                f"{i} blob",
                blob,
                headers={"content-type": "application/octet-stream"},
            )
            if r is not None and r.status_code == 200:  # an accepted state must be usable
                g = send(
                    "POST",
                    f"/v1/sessions/{sid}/generate",
                    f"{i} use-imported",
                    _dumps({"prompt": " x", "max_tokens": 2, "temperature": 1.0}),
                    bad_keys=False,
                )
                if g is not None and g.status_code != 200:
                    failures.append(f"[{i}] an imported state was accepted but cannot be used: {describe(g)}")
        elif roll < 0.90:
            send("GET", "/v1/sessions?" + rng.choice(ODD_QUERIES), f"{i} list")
        elif roll < 0.95:
            method = rng.choice(["GET", "DELETE", "PATCH", "PUT"])
            send(
                method,
                f"/v1/sessions/{rng.choice(ODD_IDS)}" + rng.choice(["", "/state", "/fork", "/nope"]),
                f"{i} odd-id",
            )
        else:
            method, path = rng.choice(
                [
                    ("GET", "/v1/completions"),
                    ("PATCH", "/v1/completions"),
                    ("DELETE", "/v1/models"),
                    ("GET", "/v1/nope"),
                    ("POST", "/v1/models"),
                ]
            )
            send(method, path, f"{i} odd-route", b"{}" if method != "GET" else None)

    # phase 2: every sampling field of /v1/completions with every hostile value
    for field in SWEEP_FIELDS:
        for value in SWEEP_VALUES:
            body = {"prompt": "Hello", "max_tokens": 2, field: value}
            send("POST", "/v1/completions", f"sweep {field}={str(value)[:20]}", _dumps(body))

    # phase 3: the server still serves a normal completion, a session, and says it is ready
    r = alice.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0})
    still_ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r2 = alice.post(f"/v1/sessions/{base_sid}/generate", json={"prompt": " end", "max_tokens": 2})
    ready = httpx.get(guard_url + "/ready", timeout=TIMEOUT)

    summary = f"{sum(counts.values())} requests, statuses {dict(sorted(counts.items()))}"
    assert not failures, f"{len(failures)} bad responses ({summary}); first ones:\n" + "\n".join(failures[:8])
    assert still_ok, f"no normal completion after the fuzz: {describe(r)}"
    assert r2.status_code == 200, describe(r2)
    assert ready.status_code == 200, ready.text
