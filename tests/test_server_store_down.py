"""With Redis down: session requests fail fast with 503, stateless completions keep working, and the
server recovers by itself when Redis comes back."""

from __future__ import annotations

import time

import httpx

from tests.server_support import run_server
from tests.test_state_support import RedisServer

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
