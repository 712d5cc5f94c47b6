"""End-to-end tests of the HTTP server: a real uvicorn process (shipped model, memory store) over httpx.

One server for the whole module (starting it costs a few seconds). Every test makes its own
sessions, so the tests do not depend on each other's order.

Session comparisons send prompts as token-id lists (tokenised here with the shipped tokenizer), so
"document then prompt" read in two requests and "document + prompt" read in one are the same tokens.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model.tokenizer import Tokenizer
from tests.support.server import run_server

MODEL_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "retserve-small"
MODEL_ID = "retserve-small"

DOCUMENT = (
    "The king rode out at dawn with twenty men, and the river ran high with the rains of spring. "
    "At the ford an old woman stood with a lantern, though the sun was already over the hills, "
    "and she would not let them pass until the king himself came down from his horse. "
    "She told him that his brother had taken the castle in the night, that the gates were shut, "
    "and that the bells of the town would ring for a new lord before the week was out."
)


# ---- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with run_server({"RETSERVE_MAX_TOKENS_LIMIT": "8192"}) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60.0) as c:
        yield c


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def doc_ids(tok: Tokenizer) -> list[int]:
    ids = tok.encode(DOCUMENT)
    assert 50 < len(ids) < 200
    return ids


def ok(r: httpx.Response, status: int = 200) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """An OpenAI error object {"error": {"message", "type", "param", "code"}} with this status."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if code is not None:
        assert err["code"] == code, err
    return err


def parse_sse(body: str) -> list[dict]:
    """The JSON payloads of an SSE body, checking the framing: `data: ...` events, blank-line
    separated, the last one `data: [DONE]` (and no other [DONE])."""
    assert body.endswith("\n\n"), body[-200:]
    events = body.split("\n\n")[:-1]
    assert events, body
    for e in events:
        assert e.startswith("data: "), e
        assert "\n" not in e, e
    payloads = [e[len("data: ") :] for e in events]
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def stream_post(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json=body) as r:
        assert r.status_code == 200, (r.status_code, r.read())
        assert r.headers["content-type"].startswith("text/event-stream")
        return parse_sse(r.read().decode("utf-8"))


def check_usage(usage: dict, prompt_tokens: int | None = None) -> None:
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert all(isinstance(v, int) for v in usage.values())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] >= 1
    if prompt_tokens is not None:
        assert usage["prompt_tokens"] == prompt_tokens


def check_head(obj: dict, obj_type: str, prefix: str) -> None:
    assert obj["object"] == obj_type
    assert isinstance(obj["id"], str) and obj["id"].startswith(prefix)
    assert isinstance(obj["created"], int) and abs(obj["created"] - time.time()) < 600
    assert obj["model"] == MODEL_ID


def create_session(client: httpx.Client, prompt: str | list[int]) -> dict:
    return ok(client.post("/v1/sessions", json={"prompt": prompt}), 201)


def session_tokens(client: httpx.Client, sid: str) -> int:
    return ok(client.get(f"/v1/sessions/{sid}"))["tokens"]


def gen(client: httpx.Client, sid: str, prompt: str | list[int], **params) -> dict:
    body = ok(client.post(f"/v1/sessions/{sid}/generate", json={"prompt": prompt, **params}))
    assert body["session_id"] == sid
    return body


def text_of(body: dict) -> str:
    return body["choices"][0]["text"]


# ---- /v1/models, /v1/completions, /v1/chat/completions -------------------------------------------


def test_models_lists_the_model(client: httpx.Client) -> None:
    body = ok(client.get("/v1/models"))
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL_ID]
    m = body["data"][0]
    assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]


def test_completion_non_streaming_shape(client: httpx.Client, tok: Tokenizer) -> None:
    prompt = "Once upon a time"
    body = ok(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12, "temperature": 0}))
    check_head(body, "text_completion", "cmpl-")
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert isinstance(choice["text"], str) and choice["text"]
    assert choice["finish_reason"] in ("length", "stop")
    assert choice["logprobs"] is None
    check_usage(body["usage"], prompt_tokens=len(tok.encode(prompt)))
    assert body["usage"]["completion_tokens"] <= 12
    if choice["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 12
    # the model name may be given; another one is a 404
    ok(client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "model": MODEL_ID}))
    assert_error(
        client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "model": "gpt-4"}),
        404,
        "model_not_found",
    )


@pytest.mark.parametrize("include_usage", [True, False])
def test_completion_stream_equals_non_streamed(client: httpx.Client, include_usage: bool) -> None:
    req = {"prompt": "The river ran", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    whole = ok(client.post("/v1/completions", json=req))
    chunks = stream_post(
        client, "/v1/completions", {**req, "stream": True, "stream_options": {"include_usage": include_usage}}
    )
    usage_chunks = [c for c in chunks if "usage" in c]
    text_chunks = [c for c in chunks if "usage" not in c]
    assert len({c["id"] for c in chunks}) == 1
    for c in chunks:
        check_head(c, "text_completion", "cmpl-")
    for c in text_chunks:
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
    reasons = [c["choices"][0]["finish_reason"] for c in text_chunks]
    assert reasons[:-1] == [None] * (len(reasons) - 1)
    assert reasons[-1] == whole["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["text"] for c in text_chunks)
    assert streamed == text_of(whole)
    if include_usage:
        assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
        assert usage_chunks[0]["choices"] == []
        assert usage_chunks[0]["usage"] == whole["usage"]
    else:
        assert usage_chunks == []


def test_chat_completion_non_streaming_shape(client: httpx.Client) -> None:
    req = {
        "messages": [
            {"role": "system", "content": "You are a storyteller."},
            {"role": "user", "content": "Tell me about the king."},
        ],
        "max_tokens": 16,
        "temperature": 0,
    }
    body = ok(client.post("/v1/chat/completions", json=req))
    check_head(body, "chat.completion", "chatcmpl-")
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("length", "stop")
    check_usage(body["usage"])
    assert body["usage"]["completion_tokens"] <= 16
    # max_completion_tokens is the newer name of max_tokens
    body2 = ok(
        client.post(
            "/v1/chat/completions",
            json={**{k: v for k, v in req.items() if k != "max_tokens"}, "max_completion_tokens": 16},
        )
    )
    assert body2["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_chat_stream_equals_non_streamed(client: httpx.Client) -> None:
    req = {
        "messages": [{"role": "user", "content": "Where did the king ride?"}],
        "max_tokens": 20,
        "temperature": 0,
    }
    whole = ok(client.post("/v1/chat/completions", json=req))
    chunks = stream_post(
        client, "/v1/chat/completions", {**req, "stream": True, "stream_options": {"include_usage": True}}
    )
    for c in chunks:
        check_head(c, "chat.completion.chunk", "chatcmpl-")
    assert len({c["id"] for c in chunks}) == 1
    *deltas, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert deltas[0]["choices"][0]["delta"]["role"] == "assistant"
    assert deltas[-1]["choices"][0]["delta"] == {}
    assert deltas[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas[:-1])
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in deltas)
    assert streamed == whole["choices"][0]["message"]["content"]
    # without stream_options: no usage chunk
    plain = stream_post(client, "/v1/chat/completions", {**req, "stream": True})
    assert all("usage" not in c and c["choices"] for c in plain)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in plain) == streamed


# ---- sessions ------------------------------------------------------------------------------------


def test_session_export_delete_import_roundtrip(
    client: httpx.Client, tok: Tokenizer, doc_ids: list[int]
) -> None:
    q_ids = tok.encode(" Question")
    params = {"max_tokens": 20, "temperature": 0}

    # created from text: the token count is the prompt's
    text_sess = create_session(client, DOCUMENT)
    assert text_sess["tokens"] == len(doc_ids)

    s = create_session(client, doc_ids)
    sid = s["id"]
    assert s["object"] == "session" and isinstance(sid, str) and sid
    assert s["tokens"] == len(doc_ids)
    assert isinstance(s["size_bytes"], int) and s["size_bytes"] > 0
    assert isinstance(s["fingerprint"], str) and s["fingerprint"]
    assert s["fingerprint"] == text_sess["fingerprint"]
    assert s["model"] == MODEL_ID
    got = ok(client.get(f"/v1/sessions/{sid}"))
    assert {k: v for k, v in got.items() if k != "expires_in"} == {
        k: v for k, v in s.items() if k != "expires_in"
    }

    r = client.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    blob = r.content
    assert blob and len(blob) == s["size_bytes"]
    assert r.headers["x-retserve-fingerprint"] == s["fingerprint"]

    a = gen(client, sid, q_ids, **params)
    check_head(a, "text_completion", "cmpl-")
    check_usage(a["usage"], prompt_tokens=len(q_ids))
    a_text = text_of(a)
    assert a_text
    assert session_tokens(client, sid) == len(doc_ids) + len(q_ids) + a["usage"]["completion_tokens"]

    deleted = ok(client.delete(f"/v1/sessions/{sid}"))
    assert deleted == {"id": sid, "object": "session.deleted", "deleted": True}
    assert_error(client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    assert_error(client.get(f"/v1/sessions/{sid}/state"), 404, "session_not_found")

    imported = ok(
        client.put(
            f"/v1/sessions/{sid}/state", content=blob, headers={"content-type": "application/octet-stream"}
        )
    )
    assert imported["id"] == sid and imported["tokens"] == len(doc_ids)
    assert imported["fingerprint"] == s["fingerprint"]

    again = gen(client, sid, q_ids, **params)
    assert text_of(again) == a_text
    assert again["usage"] == a["usage"]

    # the same tokens read in one stateless request give the same greedy continuation
    stateless = ok(client.post("/v1/completions", json={"prompt": doc_ids + q_ids, **params}))
    assert text_of(stateless) == a_text
    assert stateless["usage"]["prompt_tokens"] == len(doc_ids) + len(q_ids)
    assert stateless["usage"]["completion_tokens"] == a["usage"]["completion_tokens"]

    for x in (sid, text_sess["id"]):
        ok(client.delete(f"/v1/sessions/{x}"))


def test_fork_keeps_states_independent(client: httpx.Client, tok: Tokenizer, doc_ids: list[int]) -> None:
    q_ids = tok.encode(" Question")
    p2_ids = tok.encode(" And then the queen said")
    p3_ids = tok.encode("\nThe end of it was")
    sampled = {"max_tokens": 8, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    greedy5 = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    probe = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "logprobs": 1}

    orig = create_session(client, doc_ids)
    fork = ok(client.post(f"/v1/sessions/{orig['id']}/fork"), 201)
    assert fork["id"] != orig["id"]
    assert fork["tokens"] == orig["tokens"] == len(doc_ids)
    assert fork["fingerprint"] == orig["fingerprint"]
    named = ok(client.post(f"/v1/sessions/{orig['id']}/fork", json={"session_id": "my-fork"}), 201)
    assert named["id"] == "my-fork" and named["tokens"] == len(doc_ids)
    assert_error(client.post(f"/v1/sessions/{orig['id']}/fork", json={"session_id": orig["id"]}), 400)

    x1 = gen(client, fork["id"], q_ids, **sampled)
    assert x1["usage"]["completion_tokens"] == 8
    assert session_tokens(client, fork["id"]) == len(doc_ids) + len(q_ids) + 8
    assert session_tokens(client, orig["id"]) == len(doc_ids)  # the original did not move

    y1 = gen(client, orig["id"], p2_ids, **greedy5)
    assert session_tokens(client, orig["id"]) == len(doc_ids) + len(p2_ids) + 5
    assert session_tokens(client, fork["id"]) == len(doc_ids) + len(q_ids) + 8  # nor did the fork
    assert session_tokens(client, "my-fork") == len(doc_ids)

    x2 = gen(client, fork["id"], p3_ids, **probe)
    y2 = gen(client, orig["id"], p3_ids, **probe)
    assert session_tokens(client, fork["id"]) == len(doc_ids) + len(q_ids) + 8 + len(p3_ids) + 6
    assert session_tokens(client, orig["id"]) == len(doc_ids) + len(p2_ids) + 5 + len(p3_ids) + 6
    # different histories: different distributions for the same new prompt
    x_lps = x2["choices"][0]["logprobs"]["token_logprobs"]
    y_lps = y2["choices"][0]["logprobs"]["token_logprobs"]
    assert x_lps != y_lps

    # replay each history on a fresh session: same texts (the seeded sample included)
    ref_f = create_session(client, doc_ids)["id"]
    assert text_of(gen(client, ref_f, q_ids, **sampled)) == text_of(x1)
    rx2 = gen(client, ref_f, p3_ids, **probe)
    assert text_of(rx2) == text_of(x2)
    assert rx2["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(x_lps, abs=1e-4)

    ref_o = create_session(client, doc_ids)["id"]
    assert text_of(gen(client, ref_o, p2_ids, **greedy5)) == text_of(y1)
    ry2 = gen(client, ref_o, p3_ids, **probe)
    assert text_of(ry2) == text_of(y2)
    assert ry2["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(y_lps, abs=1e-4)

    # the untouched named fork still continues like the document alone
    assert text_of(gen(client, "my-fork", q_ids, **sampled)) == text_of(x1)

    for x in (orig["id"], fork["id"], "my-fork", ref_f, ref_o):
        ok(client.delete(f"/v1/sessions/{x}"))


def test_busy_session_gets_409(
    base_url: str, client: httpx.Client, tok: Tokenizer, doc_ids: list[int]
) -> None:
    q_ids = tok.encode(" Question")
    sid = create_session(client, doc_ids)["id"]
    long = {"prompt": q_ids, "max_tokens": 2000, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/sessions/{sid}/generate", json=long, timeout=120.0) as r:
        assert r.status_code == 200
        texts = r.iter_text()
        buf = ""
        while "\n\n" not in buf:
            buf += next(texts)
        first = json.loads(buf[: buf.index("\n\n")].removeprefix("data: "))
        assert first["choices"][0]["text"] is not None

        short = {"prompt": q_ids, "max_tokens": 2, "temperature": 0}
        err = assert_error(client.post(f"/v1/sessions/{sid}/generate", json=short), 409, "session_busy")
        assert err["type"] == "conflict_error"
        assert_error(client.post(f"/v1/sessions/{sid}/prime", json={"prompt": q_ids}), 409, "session_busy")
        assert_error(client.post("/v1/completions", json={**short, "session_id": sid}), 409, "session_busy")
        assert_error(client.post(f"/v1/sessions/{sid}/fork"), 409, "session_busy")
        assert_error(client.get(f"/v1/sessions/{sid}/state"), 409, "session_busy")
        assert_error(client.delete(f"/v1/sessions/{sid}"), 409, "session_busy")
        # metadata reads take no lease
        assert ok(client.get(f"/v1/sessions/{sid}"))["tokens"] == len(doc_ids)

        buf += "".join(texts)
    chunks = parse_sse(buf)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(c["choices"][0]["text"] for c in chunks)) > 0

    # finished: usable again, and the state holds all 2000 tokens
    assert session_tokens(client, sid) == len(doc_ids) + len(q_ids) + 2000
    primed = ok(client.post(f"/v1/sessions/{sid}/prime", json={"prompt": q_ids}))
    assert primed["tokens"] == len(doc_ids) + 2 * len(q_ids) + 2000
    ok(client.delete(f"/v1/sessions/{sid}"))


def test_client_disconnect_saves_the_delivered_tokens(
    base_url: str, client: httpx.Client, tok: Tokenizer, doc_ids: list[int]
) -> None:
    q_ids = tok.encode(" Question")
    p3_ids = tok.encode("\nThe end of it was")
    sid = create_session(client, doc_ids)["id"]
    before = session_tokens(client, sid)
    assert before == len(doc_ids)

    long = {"prompt": q_ids, "max_tokens": 5000, "ignore_eos": True, "temperature": 0, "stream": True}
    seen = ""
    with httpx.stream("POST", f"{base_url}/v1/sessions/{sid}/generate", json=long, timeout=60.0) as r:
        assert r.status_code == 200
        n = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += json.loads(line[6:])["choices"][0]["text"]
                n += 1
                if n == 5:
                    time.sleep(0.3)  # let the server run ahead of what this client has read
                    break
    # the connection is closed: the server aborts the request, saves the state and frees the session

    deadline = time.monotonic() + 5.0
    while True:
        r = client.get(f"/v1/sessions/{sid}/state")  # takes the lease, changes nothing
        if r.status_code == 200:
            break
        assert_error(r, 409, "session_busy")
        assert time.monotonic() < deadline, "the session was still busy 5 s after the client went away"
        time.sleep(0.05)

    after = session_tokens(client, sid)
    generated = after - before - len(q_ids)
    assert generated >= 5, (before, after)
    assert generated < 5000, "the generation was not aborted when the client disconnected"

    # greedy is deterministic: a stateless request for that many tokens produced the same ones
    ref = ok(
        client.post(
            "/v1/completions",
            json={
                "prompt": doc_ids + q_ids,
                "max_tokens": generated,
                "ignore_eos": True,
                "temperature": 0,
                "logprobs": 0,
            },
        )
    )
    assert ref["usage"]["completion_tokens"] == generated
    assert text_of(ref).startswith(seen)
    by_text = {**tok.special_tokens}
    for b, i in tok.mergeable_ranks.items():
        with contextlib.suppress(UnicodeDecodeError):
            by_text[b.decode("utf-8")] = i
    strings = ref["choices"][0]["logprobs"]["tokens"]
    assert all("\ufffd" not in s for s in strings), "a token is not valid UTF-8 alone; cannot map it back"
    gen_ids = [by_text[s] for s in strings]
    assert tok.decode(gen_ids) == text_of(ref)

    greedy = {"temperature": 0, "ignore_eos": True}
    cont = text_of(gen(client, sid, p3_ids, max_tokens=20, **greedy))
    # the same history read as one prompt into a fresh session
    fresh = create_session(client, doc_ids + q_ids + gen_ids)
    assert fresh["tokens"] == after
    assert text_of(gen(client, fresh["id"], p3_ids, max_tokens=20, **greedy)) == cont
    # and the same history generated to completion on a fresh session
    chained = create_session(client, doc_ids)["id"]
    assert text_of(gen(client, chained, q_ids, max_tokens=generated, **greedy)) == text_of(ref)
    assert session_tokens(client, chained) == after
    assert text_of(gen(client, chained, p3_ids, max_tokens=20, **greedy)) == cont

    for x in (sid, fresh["id"], chained):
        ok(client.delete(f"/v1/sessions/{x}"))


# ---- validation ----------------------------------------------------------------------------------


def test_unknown_session_is_404(client: httpx.Client) -> None:
    sid = "no-such-session"
    body = {"prompt": "Hello", "max_tokens": 2}
    for r in (
        client.get(f"/v1/sessions/{sid}"),
        client.get(f"/v1/sessions/{sid}/state"),
        client.delete(f"/v1/sessions/{sid}"),
        client.post(f"/v1/sessions/{sid}/generate", json=body),
        client.post(f"/v1/sessions/{sid}/prime", json={"prompt": "Hello"}),
        client.post(f"/v1/sessions/{sid}/fork"),
        client.post("/v1/completions", json={**body, "session_id": sid}),
        client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "session_id": sid},
        ),
    ):
        err = assert_error(r, 404, "session_not_found")
        assert err["type"] == "not_found_error"
        assert sid in err["message"]
    # and a failed lookup leaves no session behind
    assert_error(client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")


@pytest.mark.parametrize(
    "path", ["/v1/completions", "/v1/chat/completions", "/v1/sessions", "/v1/sessions/x/generate"]
)
def test_bad_json_is_400(client: httpx.Client, path: str) -> None:
    r = client.post(path, content=b'{"prompt": "Hello", ', headers={"content-type": "application/json"})
    err = assert_error(r, 400)
    assert err["type"] == "invalid_request_error"
    assert "not valid JSON" in err["message"]


def test_bad_json_error_names_no_parameter(client: httpx.Client) -> None:
    """`param` names a request field; a body that is not JSON has none (it is not a JSON offset)."""
    r = client.post("/v1/completions", content=b"{bad", headers={"content-type": "application/json"})
    err = assert_error(r, 400)
    assert err["param"] is None, err


def test_n_greater_than_one_is_400(client: httpx.Client, doc_ids: list[int]) -> None:
    sid = create_session(client, doc_ids[:10])["id"]
    for path, body in (
        ("/v1/completions", {"prompt": "Hello", "n": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2}),
        (f"/v1/sessions/{sid}/generate", {"prompt": "Hello", "n": 2}),
    ):
        err = assert_error(client.post(path, json=body), 400)
        assert err["param"] == "n" and err["type"] == "invalid_request_error"
    assert session_tokens(client, sid) == 10  # the rejected generate did not touch the session
    ok(client.delete(f"/v1/sessions/{sid}"))
