"""Server pieces without a subprocess: settings, rate limiter, chat template, protocol conversion, and
the app in-process (TestClient, with a dependency override for the tenant)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from server.app import create_app
from server.auth import match_key
from server.chat import CHAT_STOP, render_chat
from server.deps import get_tenant
from server.errors import APIError
from server.openapi import int_below
from server.protocol import ChatMessage, CompletionRequest
from server.ratelimit import RateLimiter
from server.settings import Settings


def test_settings_from_env_and_validation(monkeypatch):
    monkeypatch.setenv("RETSERVE_API_KEYS", '{"secret-key-1": "alice"}')
    monkeypatch.setenv("RETSERVE_PORT", "9123")
    s = Settings()
    assert s.api_keys == {"secret-key-1": "alice"} and s.port == 9123 and s.auth_enabled
    assert s.served_model_name == "retserve-small"
    with pytest.raises(ValidationError, match="store_url"):
        Settings(store_url="mysql://x")
    with pytest.raises(ValidationError, match="at least 8 characters long; one of RETSERVE_API_KEYS has 5"):
        Settings(api_keys={"short": "t"})
    with pytest.raises(ValidationError, match="tenant"):
        Settings(api_keys={"long-enough-key": "bad tenant!"})


def test_token_bucket():
    now = [0.0]
    rl = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [rl.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.take("k")
    assert wait == pytest.approx(0.5)
    assert RateLimiter.retry_after(wait) == "1"
    assert rl.take("other") == 0.0  # buckets are per key
    now[0] += 0.5
    assert rl.take("k") == 0.0
    assert RateLimiter(rate=0, burst=1).take("k") == 0.0  # off
    # peek says what take would, without spending
    assert rl.peek("fresh") == 0.0 and rl.peek("fresh") == 0.0
    rl.take("k")
    assert rl.peek("k") == pytest.approx(0.5) and rl.take("k") == pytest.approx(0.5)


def test_match_key():
    keys = {"secret-key-1": "alice", "secret-key-2": "bob"}
    assert match_key(keys, "Bearer secret-key-2") == "secret-key-2"
    assert match_key(keys, "bearer  secret-key-1 ") == "secret-key-1"
    for header in ("", "Bearer", "Bearer ", "Basic secret-key-1", "secret-key-1", "Bearer secret-key-"):
        with pytest.raises(APIError) as e:
            match_key(keys, header)
        assert e.value.status == 401 and e.value.code == "invalid_api_key", header


def test_int_below_regex():
    for n in (1, 2, 9, 10, 11, 99, 100, 101, 999, 8192, 50257):
        pattern = re.compile(int_below(n))
        assert [i for i in range(n + 150) if pattern.match(str(i))] == list(range(n)), n
        for s in ("007", "-1", "+5", " 5", "5 ", "", "1e3", str(n)):
            assert not pattern.match(s), (n, s)


def test_chat_template():
    msgs = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content=" Hi ")]
    assert render_chat(msgs) == "System: Be brief.\n\nUser: Hi\n\nAssistant:"
    assert "\nUser:" in CHAT_STOP


def test_protocol_to_sampling_params():
    req = CompletionRequest(
        prompt="x",
        temperature=0.5,
        top_k=5,
        stop="END",
        logit_bias={"7": -100},
        stop_token_ids=[3],
        min_tokens=9,
    )
    p = req.to_sampling_params(4, logprobs=True, top_logprobs=2, extra_stop=("\nUser:",))
    assert (p.temperature, p.top_k, p.max_tokens, p.min_tokens) == (0.5, 5, 4, 4)  # min_tokens <= max_tokens
    assert p.stop == ["END", "\nUser:"] and p.logit_bias == {7: -100.0} and p.stop_token_ids == [3]
    assert p.logprobs and p.top_logprobs == 2
    with pytest.raises(ValueError, match="logit_bias"):
        CompletionRequest(prompt="x", logit_bias={"a": 1}).to_sampling_params(1)
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", bogus=1)


def test_app_in_process_with_dependency_override():
    app = create_app(Settings(api_keys={"secret-key-1": "alice"}, num_threads=1))
    with TestClient(app) as client:
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        app.dependency_overrides[get_tenant] = lambda: "tester"
        r = client.post("/v1/sessions", json={"session_id": "mine", "prompt": "Hello"})
        assert r.status_code == 201, r.text
        assert r.json()["tokens"] == len(app.state.runtime.tokenizer.encode("Hello"))
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "model": "nope"})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert client.get("/ready").json()["status"] == "ready"


def test_body_limit_declared_and_chunked():
    app = create_app(Settings(max_body_bytes=2048, num_threads=1))
    with TestClient(app) as client:
        big = {"prompt": "x" * 5000, "max_tokens": 1}
        r = client.post("/v1/completions", json=big)
        assert r.status_code == 413 and "RETSERVE_MAX_BODY_BYTES" in r.json()["error"]["message"]

        def chunks(data: bytes):
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        import json

        r = client.post(
            "/v1/completions",
            content=chunks(json.dumps(big).encode()),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413
        small = json.dumps({"prompt": "Hello", "max_tokens": 1}).encode()
        r = client.post(
            "/v1/completions", content=chunks(small), headers={"content-type": "application/json"}
        )
        assert r.status_code == 200, r.text


def test_engine_failure_is_a_500_with_a_message_and_the_server_goes_on():
    app = create_app(Settings(num_threads=1))
    with TestClient(app) as client:
        cfg = app.state.runtime.engine.config

        def fail(req, prompt):
            raise RuntimeError("injected")

        cfg.keep_mask = fail
        client.post("/v1/sessions", json={"session_id": "keep", "prompt": "x"})  # fails too (prime)
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True}
        ) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and "engine_error" in lines[-2]
        assert client.get("/ready").status_code == 503  # three failed iterations in a row
        cfg.keep_mask = None
        r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert client.get("/ready").status_code == 200
        assert client.get("/v1/sessions/keep").status_code == 404  # the failed prime created nothing


@pytest.mark.slow  # starts a server process per case: `make test` runs it, `make test-fast` does not
@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"RETSERVE_MODEL_PATH": "/nonexistent"}, "RETSERVE_MODEL_PATH"),
        ({"RETSERVE_PORT": "abc"}, "port"),
        ({"RETSERVE_STORE_URL": "mysql://x"}, "store_url"),
        ({"RETSERVE_API_KEYS": "not json"}, "api_keys"),
    ],
)
def test_bad_settings_exit_with_a_message(env, says):
    import os
    import subprocess
    import sys

    from tests.support.server import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
