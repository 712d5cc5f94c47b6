"""Start the real server (uvicorn in a subprocess on a free port) for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.support.state import free_port

ROOT = Path(__file__).resolve().parents[2]


class ServerURL(str):
    """The base URL, with the server's process as `.proc` (for tests that signal it)."""

    proc: subprocess.Popen


@contextlib.contextmanager
def run_server(env: dict[str, str] | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Base URL of a server started with RETSERVE_* `env` (shipped model, memory store by default)."""
    port = free_port()
    full_env = {
        **os.environ,
        "RETSERVE_PORT": str(port),
        "RETSERVE_HOST": "127.0.0.1",
        "RETSERVE_NUM_THREADS": "1",
        "RETSERVE_LOG_LEVEL": "warning",
        **(env or {}),
    }
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the server's output, shown if it fails to start
    proc = subprocess.Popen(
        [sys.executable, "-m", "server"], cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT
    )
    url = ServerURL(f"http://127.0.0.1:{port}")
    url.proc = proc
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read()[-4000:].decode(errors="replace")
                raise RuntimeError(f"the server exited with {proc.returncode} before it was ready:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=1.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start in time")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
