"""Request bodies at the HTTP boundary, against the real server (a uvicorn subprocess):

- refused before reading: unknown paths, wrong methods, missing or bad API keys, over-declared sizes
  and too many concurrent state uploads are answered without the server reading (or buffering) the
  body, so big unauthenticated uploads cannot grow its memory;
- state uploads are spooled (bounded memory while they arrive) and counted against
  RETSERVE_MAX_STATE_UPLOADS (503 + Retry-After beyond it);
- JSON routes want `Content-Type: application/json` (415 that says so).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.e2e.test_server_guard import describe, expect_error, expect_ok
from tests.support.server import run_server

KEY = "key-bodies-123456"
MB = 1 << 20


# ---- raw HTTP/1.1 chunked uploads (httpx only reads the answer after sending the whole body) ---------
class Upload:
    """A chunked upload on its own socket: sends `total` bytes in 1 MiB chunks (or until told to stop,
    or until the server answers), while a reader thread collects the answer as soon as it comes."""

    def __init__(self, url: str, method: str, path: str, headers: dict[str, str] | None = None) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Transfer-Encoding: chunked"]
        lines += [
            f"{k}: {v}" for k, v in {"Content-Type": "application/octet-stream", **(headers or {})}.items()
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        self.answer = bytearray()
        self.answered = threading.Event()
        self.sent = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.answer += data
                head, sep, body = bytes(self.answer).partition(b"\r\n\r\n")
                if sep:
                    length = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")]
                    if length and len(body) >= int(length[0].split(b":")[1]):
                        break
        except OSError:
            pass
        finally:
            self.answered.set()

    def send(self, total: int, block: bytes = b"\x07" * MB) -> None:
        chunk = b"%x\r\n" % len(block) + block + b"\r\n"
        try:
            while self.sent < total and not self.answered.is_set():
                self.sock.sendall(chunk)
                self.sent += len(block)
        except OSError:
            pass

    def finish(self, last: bytes = b"") -> None:
        try:
            if last:
                self.sock.sendall(b"%x\r\n" % len(last) + last + b"\r\n")
            self.sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass

    def result(self, timeout: float = 60.0) -> tuple[int | None, dict[str, str], dict | None]:
        """(status, headers, JSON body) of the answer; status None if none came."""
        self.answered.wait(timeout)
        self.sock.close()
        head, _, body = bytes(self.answer).partition(b"\r\n\r\n")
        if not head:
            return None, {}, None
        lines = head.decode(errors="replace").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        return int(lines[0].split()[1]), headers, parsed


class MemoryWatch:
    """The peak resident memory of a process (Linux: VmRSS sampled every 5 ms, and VmHWM after its
    high-water mark was reset through /proc/<pid>/clear_refs), relative to where it started."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = self.start = self._read("VmRSS")
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _read(self, field: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read("VmRSS"))
            time.sleep(0.005)

    def growth(self) -> int:
        """Bytes the peak rose above the start."""
        self._stop.set()
        self._thread.join()
        peak = max(self.peak, self._read("VmHWM")) if self.hwm_reset else self.peak
        return peak - self.start


def chunked(data: bytes, size: int = 1000) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


# ---- servers -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_url() -> Iterator[str]:
    with run_server({"RETSERVE_API_KEYS": json.dumps({KEY: "bodies"})}) as url:
        yield url


@pytest.fixture(scope="module")
def open_url() -> Iterator[str]:
    """No API keys (everyone is allowed): at most one state upload at a time."""
    with run_server({"RETSERVE_MAX_STATE_UPLOADS": "1"}) as url:
        yield url


def real_blob(url: str, headers: dict[str, str], sid: str) -> bytes:
    with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
        expect_ok(c.post("/v1/sessions", json={"session_id": sid, "prompt": "Bodies are bounded."}), 201)
        r = c.get(f"/v1/sessions/{sid}/state")
        assert r.status_code == 200, describe(r)
        return r.content


# ---- tests -------------------------------------------------------------------------------------------
def test_unauthenticated_big_uploads_are_refused_without_memory_growth(keyed_url: str) -> None:
    """4 concurrent 200 MB chunked uploads without a valid key (to the state route and to a path that
    does not exist) are answered 401 / 404 while the server's resident memory stays within 64 MB."""
    pid = keyed_url.proc.pid  # type: ignore[attr-defined]
    warm = Upload(keyed_url, "PUT", "/v1/sessions/warm/state")  # the refusal path, once, before measuring
    warm.send(MB)
    warm.finish()
    assert warm.result()[0] == 401

    watch = MemoryWatch(pid)
    targets = [
        ("PUT", "/v1/sessions/big-1/state", {}),
        ("PUT", "/v1/sessions/big-2/state", {"Authorization": "Bearer wrong-key-000000"}),
        ("POST", "/nope/state", {}),
        ("POST", "/nope/state", {"Authorization": f"Bearer {KEY}"}),
    ]
    uploads = [Upload(keyed_url, m, p, h) for m, p, h in targets]
    senders = [threading.Thread(target=u.send, args=(200 * MB,)) for u in uploads]
    for t in senders:
        t.start()
    for t in senders:
        t.join(120)
    for u in uploads:
        u.finish()
    results = [u.result() for u in uploads]
    growth = watch.growth()

    sent = [u.sent // MB for u in uploads]
    print(f"4 refused 200 MB uploads: RSS grew {growth / MB:.1f} MB; MB sent before the answer: {sent}")
    statuses = [r[0] for r in results]
    assert statuses == [401, 401, 404, 404], results
    for status, _, body in results:
        assert body is not None and body["error"]["message"], (status, body)
    assert results[0][2]["error"]["code"] == "invalid_api_key"
    assert growth < 64 * MB, f"the server's resident memory grew by {growth / MB:.0f} MB"
    assert all(u.sent < 200 * MB for u in uploads), "the answers only came after the whole upload"


def test_authenticated_chunked_upload_still_works(keyed_url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    blob = real_blob(keyed_url, auth, "bodies-src")
    with httpx.Client(base_url=keyed_url, headers=auth, timeout=60) as c:
        r = c.put("/v1/sessions/bodies-copy/state", content=chunked(blob, 4096))
        info = expect_ok(r)
        src = expect_ok(c.get("/v1/sessions/bodies-src"))
        assert info["tokens"] == src["tokens"] and info["size_bytes"] == len(blob), info
        assert c.get("/v1/sessions/bodies-copy/state").content == blob
        # with Content-Length too, and the raw socket client
        expect_ok(c.put("/v1/sessions/bodies-copy2/state", content=blob))
    up = Upload(keyed_url, "PUT", "/v1/sessions/bodies-copy3/state", auth)
    up.finish(blob)
    status, _, body = up.result()
    assert status == 200 and body["tokens"] == info["tokens"], body


def test_wrong_method_and_unknown_path_with_a_body(keyed_url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=keyed_url, headers=auth, timeout=60) as c:
        r = c.post("/v1/sessions/x/state", content=b"\x00" * 5000)
        expect_error(r, 405)
        assert "PUT" in r.headers.get("allow", ""), r.headers
        expect_error(c.post("/v1/nope", json={"a": 1}), 404)
        expect_error(
            c.put("/v1/sessions/x/state", content=b"\x00" * 100, headers={"Authorization": "Bearer"}), 401
        )


def test_json_routes_want_application_json(keyed_url: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    body = json.dumps({"prompt": "Hi", "max_tokens": 1}).encode()
    with httpx.Client(base_url=keyed_url, headers=auth, timeout=60) as c:
        for ctype in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            headers = {"content-type": ctype} if ctype else {}
            err = expect_error(c.post("/v1/completions", content=body, headers=headers), 415)
            assert "Content-Type: application/json" in err["message"], err
        for ctype in ("application/json", "application/json; charset=utf-8", "application/vnd.x+json"):
            expect_ok(c.post("/v1/completions", content=body, headers={"content-type": ctype}))
        # a fork needs no body at all (and then no Content-Type)
        expect_ok(c.post("/v1/sessions", json={"session_id": "ct-src"}), 201)
        expect_ok(c.post("/v1/sessions/ct-src/fork"), 201)


def test_concurrent_state_uploads_are_limited(open_url: str) -> None:
    """No keys configured: the damage is bounded by RETSERVE_MAX_STATE_UPLOADS (1 here): a second
    upload while one is in flight is a 503 with Retry-After, answered without reading its body."""
    blob = real_blob(open_url, {}, "open-src")
    first = Upload(open_url, "PUT", "/v1/sessions/open-1/state")
    first.send(2 * MB)  # in flight: the server is spooling it
    time.sleep(0.3)
    pid = open_url.proc.pid  # type: ignore[attr-defined]
    watch = MemoryWatch(pid)
    second = Upload(open_url, "PUT", "/v1/sessions/open-2/state")
    second.send(100 * MB)
    status, headers, body = second.result()
    assert status == 503, (status, body)
    assert body["error"]["code"] == "too_many_uploads" and headers.get("retry-after", "").isdigit(), body
    assert second.sent < 100 * MB
    # the first is still going; its spool keeps it out of memory while it arrives
    first.send(2 * MB + 64 * MB)
    assert watch.growth() < 32 * MB
    first.finish()
    status, _, body = first.result()
    assert status == 400 and body["error"]["code"] == "invalid_state", body
    # the slot is free again
    with httpx.Client(base_url=open_url, timeout=60) as c:
        info = expect_ok(c.put("/v1/sessions/open-3/state", content=chunked(blob, 4096)))
        assert info["size_bytes"] == len(blob)
