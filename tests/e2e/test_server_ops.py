"""Server operations: Redis down and back (session requests fail fast with 503, stateless completions
keep working, recovery), graceful shutdown mid-stream, engine overload."""

from __future__ import annotations

import itertools
import json
import signal
import time

import httpx

from tests.support.server import run_server
from tests.support.state import RedisServer

BODY = {"prompt": "The king", "max_tokens": 4, "temperature": 0}


def test_redis_down_then_back(tmp_path):
    redis_srv = RedisServer(tmp_path)
    redis_srv.start()
    try:
        with (
            run_server({"RETSERVE_STORE_URL": redis_srv.url}) as url,
            httpx.Client(base_url=url, timeout=30) as c,
        ):
            assert c.get("/ready").status_code == 200
            r = c.post("/v1/sessions", json={"session_id": "s1", "prompt": "Hello there"})
            assert r.status_code == 201, r.text

            redis_srv.kill()
            t0 = time.monotonic()
            r = c.post("/v1/sessions", json={"session_id": "s2", "prompt": "Hello"})
            took = time.monotonic() - t0
            assert r.status_code == 503, r.text
            assert "store" in r.json()["error"]["message"] and r.headers.get("retry-after")
            assert took < 10, f"a session request with Redis down took {took:.1f}s"
            r = c.post("/v1/completions", json={**BODY, "session_id": "s1"})
            assert r.status_code == 503, r.text
            r = c.post("/v1/completions", json=BODY)  # stateless: still served
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
            ready = c.get("/ready")
            assert ready.status_code == 503 and ready.json()["checks"]["store"] is False

            redis_srv.start()  # same port, empty (no persistence)
            deadline = time.monotonic() + 20
            while True:
                r = c.post("/v1/sessions", json={"session_id": "s3", "prompt": "Back again"})
                if r.status_code == 201 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert r.status_code == 201, r.text
            assert c.get("/ready").status_code == 200
            r = c.post("/v1/sessions/s3/generate", json=BODY)
            assert r.status_code == 200, r.text
    finally:
        redis_srv.kill()


def test_shutdown_mid_stream_saves_the_session(tmp_path):
    """SIGTERM while a session streams: after the grace period the request is aborted, the stream
    ends with an error event and [DONE], and the session is saved with exactly the prompt plus the
    delivered tokens before the store closes; a new server continues from it."""
    redis_srv = RedisServer(tmp_path)
    redis_srv.start()
    env = {"RETSERVE_STORE_URL": redis_srv.url, "RETSERVE_SHUTDOWN_TIMEOUT_S": "1"}
    body = {"prompt": " And", "max_tokens": 4000, "temperature": 0, "ignore_eos": True, "stream": True}
    try:
        with run_server(env) as url, httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v1/sessions", json={"session_id": "long", "prompt": "Once upon a time"})
            assert r.status_code == 201, r.text
            before = r.json()["tokens"]
            n_prompt = c.post("/v1/completions", json={"prompt": " And", "max_tokens": 0}).json()["usage"]
            with c.stream("POST", "/v1/sessions/long/generate", json={**body, "logprobs": 0}) as resp:
                lines = resp.iter_lines()
                got = [ln for ln in itertools.islice(lines, 20) if ln.startswith("data: {")]
                assert got
                url.proc.send_signal(signal.SIGTERM)  # shut down while this stream is open
                tail = [ln for ln in lines if ln.startswith("data: ")]  # ends cleanly, no cut
            assert url.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
        assert tail[-1] == "data: [DONE]" and '"error"' in tail[-2], tail[-3:]
        chunks = [json.loads(ln[6:]) for ln in [*got, *tail[:-2]]]
        delivered = sum(len(ch["choices"][0]["logprobs"]["tokens"]) for ch in chunks if ch["choices"])
        assert 0 < delivered < 4000
        with run_server(env) as url, httpx.Client(base_url=url, timeout=30) as c:
            info = c.get("/v1/sessions/long").json()
            assert info["tokens"] == before + n_prompt["prompt_tokens"] + delivered, (info, delivered)
    finally:
        redis_srv.kill()


def test_engine_overload_is_503_with_retry_after():
    env = {"RETSERVE_MAX_RUNNING": "1", "RETSERVE_MAX_WAITING": "1"}
    long = {"prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with (
        run_server(env) as url,
        httpx.Client(base_url=url, timeout=30) as c1,
        httpx.Client(base_url=url, timeout=30) as c2,
        httpx.Client(base_url=url, timeout=30) as c3,
    ):
        with (
            c1.stream("POST", "/v1/completions", json=long) as a,
            c2.stream("POST", "/v1/completions", json=long) as b,
        ):
            assert a.status_code == 200 and b.status_code == 200  # one running, one waiting
            r = c3.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] and r.json()["error"]["code"] == "overloaded"
        # both streams closed: their requests were aborted and the engine is free again
        deadline = time.monotonic() + 10
        while (r := c3.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1})).status_code == 503:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.1)
        assert r.status_code == 200


def test_non_streaming_client_that_leaves_aborts_its_request():
    """A non-streaming client that times out: the engine aborts the request (no 4,000-token run
    to the end), the session keeps what was generated until then and its lease is released."""
    with run_server() as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/sessions", json={"session_id": "nb", "prompt": "Once upon a time"})
        before = r.json()["tokens"]
        body = {"prompt": " And", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
        t0 = time.monotonic()
        try:
            c.post("/v1/sessions/nb/generate", json=body, timeout=0.5)
            raise AssertionError("expected the client to time out")
        except httpx.ReadTimeout:
            pass
        deadline = time.monotonic() + 10
        while (r := c.post("/v1/sessions/nb/prime", json={"prompt": "."})).status_code == 409:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert r.status_code == 200, r.text
        took = time.monotonic() - t0
        after = r.json()["tokens"]
        assert before < after < before + 4000, (before, after)
        assert took < 5, f"the aborted request ran for {took:.1f}s"
        metrics = c.get("/metrics").text
        assert 'retserve:request_success_total{finished_reason="abort"} 1.0' in metrics
