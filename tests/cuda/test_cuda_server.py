"""Server smoke test on each device: the real server (shipped model, memory store) started with
RETSERVE_DEVICE=<device> and the default dtype (bf16 weights on cuda, float32 on cpu; states float32)
answers completions (streamed and not), and creates, exports, imports and continues sessions."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.cuda.common import DEVICES
from tests.support.server import run_server


def _ok(r: httpx.Response) -> dict:
    assert r.status_code in (200, 201), r.text
    return r.json()


def _stream_text(client: httpx.Client, body: dict) -> str:
    text = ""
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        chunk = json.loads(ln.removeprefix("data: "))
        assert "error" not in chunk, chunk
        text += "".join(c["text"] for c in chunk["choices"])
    return text


@pytest.mark.parametrize("device", DEVICES)
def test_server_smoke(device):
    with run_server({"RETSERVE_DEVICE": device}) as url, httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/ready").status_code == 200
        (model,) = _ok(client.get("/v1/models"))["data"]
        req = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        whole = _ok(client.post("/v1/completions", json=req))
        choice = whole["choices"][0]
        assert choice["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 8
        assert _stream_text(client, req) == choice["text"]

        # a session: create from a prompt (float32 state whatever the weights), export, import, continue
        s = _ok(client.post("/v1/sessions", json={"prompt": "The ship sailed from Nantucket at dawn."}))
        assert s["tokens"] > 0 and s["dtype"] == "float32" and s["model"] == model["id"]
        blob = client.get(f"/v1/sessions/{s['id']}/state")
        assert blob.status_code == 200 and len(blob.content) == s["size_bytes"]
        headers = {"content-type": "application/octet-stream"}
        copy = _ok(client.put("/v1/sessions/copy/state", content=blob.content, headers=headers))
        assert copy["tokens"] == s["tokens"] and copy["fingerprint"] == s["fingerprint"]
        gen = {"prompt": " Then", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
        a = _ok(client.post(f"/v1/sessions/{s['id']}/generate", json=gen))
        b = _ok(client.post("/v1/sessions/copy/generate", json=gen))
        assert a["choices"][0]["text"] == b["choices"][0]["text"]  # the same state, the same greedy tokens
        after = _ok(client.get(f"/v1/sessions/{s['id']}"))
        assert after["tokens"] == s["tokens"] + a["usage"]["prompt_tokens"] + 6
        # a bad request is still a clear 400 on this device
        bad = client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
        assert bad.status_code == 400 and "error" in bad.json()
