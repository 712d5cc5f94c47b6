"""Session memory over HTTP, against a real server (uvicorn subprocess, shipped 4-layer model):

- next-token logits saved with every session save: a session continues without new input (empty
  prompt), exactly as a stateless completion of everything it read;
- `token_dropping` on every endpoint that reads a prompt, the dropped count in
  `usage.prompt_tokens_details.dropped_tokens`, keep 1.0 identical to none, the server default;
- POST /v1/sessions/merge (concat, average), sources untouched, tenants isolated;
- bad inputs: 400 (or 404 / 409) with OpenAI error objects; out-of-bound state imports refused.

Prompts are token-id lists, so "read in two requests" and "read in one" are the same tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import httpx
import pytest
import torch

from model.checkpoint import load_config
from model.tokenizer import Tokenizer
from state_store import StateCodec
from tests.e2e.test_server_e2e import DOCUMENT, MODEL_DIR, assert_error, ok, parse_sse, stream_post
from tests.support.server import run_server

GREEDY = {"temperature": 0, "max_tokens": 8}
DROP = {"policy": "decayed", "keep": 0.5, "sinks": 1, "recent": 1}  # forced: first and last token
KEYS = {"key-tenant-one-0001": "one", "key-tenant-two-0002": "two"}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with run_server({"RETSERVE_MAX_TOKENS_LIMIT": "8192"}) as u:
        yield u


@pytest.fixture(scope="module")
def c(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def doc(tok: Tokenizer) -> list[int]:
    return tok.encode(DOCUMENT)


def completion(c: httpx.Client, prompt: list[int] | str, **kw) -> dict:
    return ok(c.post("/v1/completions", json={"prompt": prompt, **GREEDY, **kw}))


def new_session(c: httpx.Client, prompt: list[int] | str | None = None, **kw) -> dict:
    return ok(c.post("/v1/sessions", json={"prompt": prompt, **kw}), 201)


def text(body: dict) -> str:
    return body["choices"][0]["text"]


def dropped(usage: dict) -> int:
    return usage["prompt_tokens_details"]["dropped_tokens"]


def half_dropped(n: int) -> int:
    """Tokens DROP leaves out of an n-token prompt: n - ceil(n / 2) (the forced two are within the half)."""
    return n - math.ceil(n / 2)


# ---- continuing from the saved next-token logits ------------------------------------------------


@pytest.mark.parametrize("empty", ["omitted", "", []])
def test_empty_prompt_continues_like_the_stateless_completion(
    c: httpx.Client, doc: list[int], empty: object
) -> None:
    sid = new_session(c, doc[:40])["id"]
    ok(c.post(f"/v1/sessions/{sid}/prime", json={"prompt": doc[40:]}))  # two reads, logits of the last
    body = {} if empty == "omitted" else {"prompt": empty}
    out = ok(c.post(f"/v1/sessions/{sid}/generate", json={**body, **GREEDY}))
    assert out["usage"]["prompt_tokens"] == 0
    assert text(out) == text(completion(c, doc))
    assert ok(c.get(f"/v1/sessions/{sid}"))["tokens"] == len(doc) + 8


def test_generate_saves_logits_so_continuations_chain(c: httpx.Client, doc: list[int]) -> None:
    """4 + 4 tokens continued without input, in two requests (the second through /v1/completions with
    a session_id) == 8 tokens of the stateless completion."""
    sid = new_session(c, doc)["id"]
    first = ok(c.post(f"/v1/sessions/{sid}/generate", json={"temperature": 0, "max_tokens": 4}))
    second = completion(c, "", session_id=sid, max_tokens=4)
    assert text(first) + text(second) == text(completion(c, doc))


def test_streamed_continuation_equals_non_streamed(c: httpx.Client, doc: list[int]) -> None:
    sid = new_session(c, doc)["id"]
    chunks = stream_post(c, f"/v1/sessions/{sid}/generate", {**GREEDY, "stream": True})
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == text(completion(c, doc))


def test_fork_and_export_import_keep_the_logits(c: httpx.Client, doc: list[int]) -> None:
    sid = new_session(c, doc)["id"]
    fork = ok(c.post(f"/v1/sessions/{sid}/fork"), 201)["id"]
    blob = export(c, sid)
    ok(c.put("/v1/sessions/reimported/state", content=blob))
    want = text(completion(c, doc))
    for s in (fork, "reimported"):
        assert text(ok(c.post(f"/v1/sessions/{s}/generate", json=GREEDY))) == want


def test_no_saved_logits_is_400(c: httpx.Client) -> None:
    sid = new_session(c)["id"]  # empty: nothing read, no logits
    err = assert_error(c.post(f"/v1/sessions/{sid}/generate", json=GREEDY), 400, "prompt_required")
    assert "send a prompt" in err["message"] and err["param"] == "prompt"
    assert_error(c.post("/v1/completions", json={"prompt": [], "session_id": sid}), 400, "prompt_required")
    assert_error(c.post("/v1/completions", json={"prompt": ""}), 400)  # stateless: nothing to continue
    assert ok(c.get(f"/v1/sessions/{sid}"))["tokens"] == 0  # unchanged
    assert_error(c.post("/v1/sessions/nope-not-here/generate", json=GREEDY), 404, "session_not_found")


# ---- token dropping -----------------------------------------------------------------------------


def test_dropping_on_completions_and_chat(c: httpx.Client, doc: list[int]) -> None:
    out = completion(c, doc, token_dropping=DROP)
    assert out["usage"]["prompt_tokens"] == len(doc)
    assert dropped(out["usage"]) == half_dropped(len(doc)) > 0
    chunks = stream_post(
        c,
        "/v1/completions",
        {
            "prompt": doc,
            **GREEDY,
            "token_dropping": DROP,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert dropped(chunks[-1]["usage"]) == half_dropped(len(doc))
    assert "".join(ch["choices"][0]["text"] for ch in chunks[:-1]) == text(out)

    msgs = [{"role": "user", "content": DOCUMENT}]
    chat = ok(c.post("/v1/chat/completions", json={"messages": msgs, **GREEDY, "token_dropping": DROP}))
    n = chat["usage"]["prompt_tokens"]
    assert dropped(chat["usage"]) == half_dropped(n) > 0
    plain = ok(c.post("/v1/chat/completions", json={"messages": msgs, **GREEDY}))
    assert "prompt_tokens_details" not in plain["usage"]


def test_dropping_on_session_create_prime_generate(c: httpx.Client, doc: list[int]) -> None:
    created = new_session(c, doc, token_dropping=DROP)
    sid = created["id"]
    assert created["tokens"] == len(doc)  # positions count every token read, dropped or not
    assert dropped(created["usage"]) == half_dropped(len(doc))
    assert created["provenance"]["token_dropping"] == "decayed keep=0.5 sinks=1 recent=1 from_layer=1"

    primed = ok(c.post(f"/v1/sessions/{sid}/prime", json={"prompt": doc, "token_dropping": DROP}))
    assert primed["tokens"] == 2 * len(doc)
    assert primed["usage"] == {
        "prompt_tokens": len(doc),
        "completion_tokens": 0,
        "total_tokens": len(doc),
        "prompt_tokens_details": {"dropped_tokens": half_dropped(len(doc))},
    }
    out = ok(c.post(f"/v1/sessions/{sid}/generate", json={"prompt": doc, **GREEDY, "token_dropping": DROP}))
    assert dropped(out["usage"]) == half_dropped(len(doc))
    assert ok(c.get(f"/v1/sessions/{sid}"))["tokens"] == 3 * len(doc) + 8

    plain = new_session(c, doc)  # no dropping: no usage (a session object as GET returns it), no label
    assert "usage" not in plain
    assert plain["provenance"]["token_dropping"] is None


def test_keep_one_is_identical_to_no_dropping(c: httpx.Client, doc: list[int]) -> None:
    kw = {"logprobs": 3, "max_tokens": 12}
    plain = completion(c, doc, **kw)
    kept = completion(c, doc, token_dropping={"policy": "norm", "keep": 1.0}, **kw)
    assert kept["choices"] == plain["choices"]  # text and every logprob
    assert kept["usage"] == plain["usage"]
    s1, s2 = new_session(c, doc)["id"], new_session(c, doc, token_dropping={"keep": 1})["id"]
    codec = StateCodec(
        load_config(MODEL_DIR), c.get(f"/v1/sessions/{s1}/state").headers["X-Retserve-Fingerprint"]
    )
    x, y = codec.decode(export(c, s1)), codec.decode(export(c, s2))
    assert all(torch.equal(p, q) for p, q in zip(x.state.layers, y.state.layers, strict=True))
    assert x.logits is not None and y.logits is not None and torch.equal(x.logits, y.logits)
    assert x.meta.provenance == y.meta.provenance  # no dropping label either


def test_dropping_metric_counts_dropped_tokens(c: httpx.Client, doc: list[int]) -> None:
    def total() -> float:
        line = next(
            x
            for x in c.get("/metrics").text.splitlines()
            if x.startswith("retserve:prompt_tokens_dropped_total")
        )
        return float(line.split()[-1])

    before = total()
    completion(c, doc, token_dropping=DROP)
    assert total() - before == half_dropped(len(doc))


BAD_DROPPING = [
    ({"policy": "lru", "keep": 0.5}, "policy"),
    ({"keep": 0}, "keep"),
    ({"keep": 1.5}, "keep"),
    ({"keep": "0.5"}, "keep"),
    ({"keep": 0.5, "from_layer": 99}, "from_layer"),
    ({"keep": 0.5, "from_layer": 4}, "from_layer"),  # the model has 4 layers: 0..3
    ({"keep": 0.5, "sinks": -1}, "sinks"),
    ({"keep": 0.5, "window": 3}, "window"),
    ({"policy": "norm"}, "keep"),
]


@pytest.mark.parametrize(("spec", "named"), BAD_DROPPING)
def test_bad_dropping_is_400_on_every_endpoint(
    c: httpx.Client, doc: list[int], spec: dict, named: str
) -> None:
    sid = new_session(c, doc[:8])["id"]
    msgs = [{"role": "user", "content": "hi"}]
    for path, body in [
        ("/v1/completions", {"prompt": "hi"}),
        ("/v1/chat/completions", {"messages": msgs}),
        ("/v1/sessions", {"prompt": "hi"}),
        (f"/v1/sessions/{sid}/prime", {"prompt": "hi"}),
        (f"/v1/sessions/{sid}/generate", {"prompt": "hi"}),
    ]:
        err = assert_error(c.post(path, json={**body, "token_dropping": spec}), 400)
        assert err["type"] == "invalid_request_error"
        assert named in err["message"] and err["param"] == f"token_dropping.{named}", (path, err)
    assert ok(c.get(f"/v1/sessions/{sid}"))["tokens"] == 8  # nothing was read


# ---- merging ------------------------------------------------------------------------------------


def export(c: httpx.Client, sid: str) -> bytes:
    r = c.get(f"/v1/sessions/{sid}/state")
    assert r.status_code == 200, r.text
    return r.content


def merge(c: httpx.Client, **body) -> httpx.Response:
    return c.post("/v1/sessions/merge", json=body)


@pytest.mark.parametrize("mode", ["concat", "average"])
def test_merge_creates_a_session_and_leaves_sources_unchanged(
    c: httpx.Client, doc: list[int], mode: str
) -> None:
    a, b = new_session(c, doc[:30])["id"], new_session(c, doc[30:])["id"]
    before = [export(c, a), export(c, b)]
    body: dict = {"sources": [a, b], "mode": mode, "session_id": f"merged-{mode}"}
    if mode == "average":
        body["weights"] = [0.25, 0.75]
    m = ok(merge(c, **body), 201)
    assert m["id"] == f"merged-{mode}" and m["object"] == "session"
    assert m["provenance"]["merged_from"] == [a, b]
    tokens = len(doc) if mode == "concat" else max(30, len(doc) - 30)
    assert m["tokens"] == tokens
    assert m["provenance"]["merge_mode"] == mode
    assert m["provenance"]["merge_weights"] == ([] if mode == "concat" else [0.25, 0.75])
    assert [export(c, a), export(c, b)] == before  # byte for byte

    out = ok(c.post(f"/v1/sessions/{m['id']}/generate", json={"prompt": doc[:5], **GREEDY}))
    assert out["usage"]["completion_tokens"] == 8
    assert ok(c.get(f"/v1/sessions/{m['id']}"))["tokens"] == tokens + 5 + 8
    assert [export(c, a), export(c, b)] == before


def test_concat_carries_the_last_sources_logits_and_average_none(c: httpx.Client, doc: list[int]) -> None:
    a, b = new_session(c, doc[:20])["id"], new_session(c, doc[20:])["id"]
    cat = ok(merge(c, sources=[a, b], mode="concat"), 201)["id"]
    out = ok(c.post(f"/v1/sessions/{cat}/generate", json={"temperature": 0, "max_tokens": 1}))
    # the first token is sampled from b's saved logits (whatever the merged state then reads)
    assert text(out) == text(completion(c, doc[20:], max_tokens=1))
    avg = ok(merge(c, sources=[a, b], mode="average"), 201)["id"]  # uniform weights by default
    prov = ok(c.get(f"/v1/sessions/{avg}"))["provenance"]
    assert prov["merge_mode"] == "average" and prov["merge_weights"] == [0.5, 0.5]
    assert_error(c.post(f"/v1/sessions/{avg}/generate", json=GREEDY), 400, "prompt_required")


def test_merge_metric(c: httpx.Client, doc: list[int]) -> None:
    def count(mode: str) -> float:
        prefix = f'retserve:session_merges_total{{mode="{mode}"}}'
        return float(next(x for x in c.get("/metrics").text.splitlines() if x.startswith(prefix)).split()[-1])

    a, b = new_session(c, doc[:10])["id"], new_session(c, doc[10:])["id"]
    before = count("concat")
    ok(merge(c, sources=[a, b], mode="concat"), 201)
    assert count("concat") == before + 1


def test_bad_merges(c: httpx.Client, doc: list[int]) -> None:
    a, b = new_session(c, doc[:10])["id"], new_session(c, doc[10:])["id"]
    cases = [
        ({"sources": [a], "mode": "concat"}, 400, "sources"),
        ({"sources": [], "mode": "concat"}, 400, "sources"),
        ({"sources": [a, b], "mode": "sum"}, 400, "mode"),
        ({"sources": [a, b]}, 400, "mode"),
        ({"sources": [a, b], "mode": "average", "weights": [1.0]}, 400, "weights"),
        ({"sources": [a, b], "mode": "average", "weights": [1.5, -0.5]}, 400, "weights"),
        ({"sources": [a, b], "mode": "average", "weights": [0.5, 0.6]}, 400, "sum to 1"),
        ({"sources": [a, b], "mode": "average", "weights": ["0.5", "0.5"]}, 400, "weights"),
        ({"sources": [a, b], "mode": "concat", "weights": [0.5, 0.5]}, 400, "average"),
        ({"sources": [a, a], "mode": "concat"}, 400, "twice"),
        ({"sources": [a, "no-such-session"], "mode": "concat"}, 404, "no-such-session"),
        ({"sources": [a, b], "mode": "concat", "session_id": a}, 409, "exists"),
        ({"sources": [a, b], "mode": "concat", "session_id": "bad id!"}, 400, "session_id"),
    ]
    for body, status, named in cases:
        err = assert_error(merge(c, **body), status)
        assert named in err["message"], (body, err)
    taken = new_session(c)["id"]
    assert_error(merge(c, sources=[a, b], mode="concat", session_id=taken), 409, "session_exists")
    ok(merge(c, sources=[a, b], mode="concat", session_id="fresh-merge-id"), 201)
    assert_error(merge(c, sources=[a, b], mode="concat", session_id="fresh-merge-id"), 409, "session_exists")


def test_merge_of_a_busy_source_is_409(url: str, c: httpx.Client, doc: list[int]) -> None:
    a, b = new_session(c, doc[:10])["id"], new_session(c, doc[10:])["id"]
    long = {"prompt": doc[:3], "max_tokens": 8000, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{url}/v1/sessions/{b}/generate", json=long, timeout=120.0) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        assert_error(merge(c, sources=[a, b], mode="concat"), 409, "session_busy")
    # the stream was closed: its request aborted and saved, then the lease was released
    for _ in range(100):
        if (r2 := merge(c, sources=[a, b], mode="concat")).status_code != 409:
            break
    assert r2.status_code == 201, r2.text


def test_merge_is_a_reserved_path_not_a_session_id(c: httpx.Client) -> None:
    """/v1/sessions/merge is only the merge endpoint: other methods are 405 (Allow: POST), and no
    session can be named "merge"."""
    for method in ("GET", "DELETE"):
        r = c.request(method, "/v1/sessions/merge")
        assert_error(r, 405, "method_not_allowed")
        assert r.headers["Allow"] == "POST"
    assert_error(c.post("/v1/sessions/merge", json={}), 400)
    for path, body in [
        ("/v1/sessions", {"session_id": "merge"}),
        ("/v1/sessions/merge", {"sources": ["x", "y"], "mode": "concat", "session_id": "merge"}),
        ("/v1/completions", {"prompt": "hi", "session_id": "merge"}),
    ]:
        err = assert_error(c.post(path, json=body), 400)
        assert "reserved" in err["message"], err
    assert_error(c.post("/v1/sessions/merge/prime", json={"prompt": "hi"}), 404)


# ---- imports are bounded ------------------------------------------------------------------------


def test_import_of_an_out_of_bound_state_is_400(c: httpx.Client, doc: list[int]) -> None:
    sid = new_session(c, doc)["id"]
    blob = export(c, sid)
    fingerprint = c.get(f"/v1/sessions/{sid}/state").headers["X-Retserve-Fingerprint"]
    unbounded = StateCodec(load_config(MODEL_DIR), fingerprint)  # only finiteness checked
    decoded = unbounded.decode(blob)
    for t in decoded.state.layers:
        t.mul_(1e6)  # far beyond anything the model can write
    forged = unbounded.encode(decoded.state)
    err = assert_error(c.put("/v1/sessions/forged/state", content=forged), 400, "invalid_state")
    assert "bound" in err["message"] or "beyond" in err["message"], err
    assert_error(c.get("/v1/sessions/forged"), 404)
    ok(c.put("/v1/sessions/imported-ok/state", content=blob))  # the untouched blob imports


# ---- a second server: API keys (tenants) and a default token dropping ---------------------------


@pytest.fixture(scope="module")
def keyed_url() -> Iterator[str]:
    env = {
        "RETSERVE_API_KEYS": json.dumps(KEYS),
        "RETSERVE_TOKEN_DROPPING": json.dumps({"policy": "recency", "keep": 0.5, "sinks": 1, "recent": 1}),
    }
    with run_server(env) as u:
        yield u


def client_for(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60.0, headers={"Authorization": f"Bearer {key}"})


def test_tenants_cannot_merge_each_others_sessions(keyed_url: str, doc: list[int]) -> None:
    k1, k2 = list(KEYS)
    with client_for(keyed_url, k1) as one, client_for(keyed_url, k2) as two:
        a, b = new_session(one, doc[:10])["id"], new_session(one, doc[10:])["id"]
        mine = new_session(two, doc[:10])["id"]
        err = assert_error(merge(two, sources=[mine, a], mode="concat"), 404, "session_not_found")
        assert a in err["message"]
        assert_error(merge(two, sources=[a, b], mode="average"), 404, "session_not_found")
        m = ok(merge(one, sources=[a, b], mode="concat"), 201)
        assert_error(two.get(f"/v1/sessions/{m['id']}"), 404, "session_not_found")


def test_server_default_dropping_and_turning_it_off(keyed_url: str, doc: list[int]) -> None:
    with client_for(keyed_url, next(iter(KEYS))) as one:
        default = completion(one, doc)
        assert dropped(default["usage"]) == half_dropped(len(doc))
        off = completion(one, doc, token_dropping=None)
        assert "prompt_tokens_details" not in off["usage"]
        keep_all = completion(one, doc, token_dropping={"keep": 1.0})
        assert keep_all["choices"] == off["choices"] and "prompt_tokens_details" not in keep_all["usage"]
        own = completion(one, doc, token_dropping={"policy": "norm", "keep": 0.25, "sinks": 0, "recent": 1})
        assert dropped(own["usage"]) == len(doc) - math.ceil(len(doc) / 4)
        # a continuation reads no prompt: the default drops nothing and does not get in the way
        sid = new_session(one, doc, token_dropping=None)["id"]
        cont = ok(one.post(f"/v1/sessions/{sid}/generate", json=GREEDY))
        assert text(cont) == text(off)


def test_bad_default_dropping_stops_the_server() -> None:
    env = {"RETSERVE_TOKEN_DROPPING": json.dumps({"keep": 0.5, "from_layer": 7})}
    with pytest.raises(RuntimeError, match="from_layer"), run_server(env):
        pass


def test_a_merged_session_streams(c: httpx.Client, doc: list[int]) -> None:
    a, b = new_session(c, doc[:10])["id"], new_session(c, doc[10:])["id"]
    m = ok(merge(c, sources=[a, b], mode="concat"), 201)["id"]
    with c.stream("POST", f"/v1/sessions/{m}/generate", json={**GREEDY, "stream": True}) as r:
        chunks = parse_sse(r.read().decode())
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
