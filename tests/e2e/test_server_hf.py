"""The server serves an fla-hub-shaped model directory unchanged (tests/support/hf_model.py builds one:
sharded bf16 weights, a Llama-style `tokenizer.json`, a Llama-2 chat template).

The chat prompt is checked against a rendering done here independently (jinja2 + the `tokenizers`
library directly, as transformers' `apply_chat_template` would), by sending those ids to
/v1/completions and comparing the greedy replies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

from model.checkpoint import load_config
from model.state import RetentionState
from tests.support.hf_model import build_hf_model
from tests.support.server import run_server

MODEL_ID = "retnet-hf-test"
GREEDY = {"temperature": 0, "max_tokens": 10}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("hf") / "retnet-tiny")


@pytest.fixture(scope="module")
def client(model_dir: Path) -> Iterator[httpx.Client]:
    env = {"RETSERVE_MODEL_PATH": str(model_dir), "RETSERVE_MODEL_NAME": MODEL_ID}
    with run_server(env) as url, httpx.Client(base_url=url, timeout=60.0) as c:
        yield c


def ok(r: httpx.Response, status: int = 200) -> dict:
    assert r.status_code == status, r.text
    return r.json()


def independent_chat_ids(model_dir: Path, messages: list[dict]) -> list[int]:
    """transformers' rendering, redone from the files: sandboxed jinja2, then `tokenizers` without
    added special tokens (the template writes `<s>` itself)."""
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())

    def raise_exception(msg: str) -> None:
        raise jinja2.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    text = env.from_string(cfg["chat_template"]).render(
        messages=messages, add_generation_prompt=True, bos_token="<s>", eos_token="</s>"
    )
    tok = RustTokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tok.encode(text, add_special_tokens=False).ids


def stream_text(client: httpx.Client, path: str, body: dict) -> tuple[list[str], dict | None]:
    deltas: list[str] = []
    finish = None
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            deltas.append(choice.get("text", choice.get("delta", {}).get("content")) or "")
            finish = choice.get("finish_reason") or finish
    return deltas, finish


def test_models_reports_context_and_state_size(client: httpx.Client, model_dir: Path) -> None:
    (card,) = ok(client.get("/v1/models"))["data"]
    config = load_config(model_dir)
    assert card["id"] == MODEL_ID and card["context_length"] == 2048
    assert card["state_bytes_per_session"] == RetentionState.empty(config, 1).nbytes
    assert card["dtype"] == "bfloat16"  # stored bf16, served without an upcast copy on CPU


def test_chat_uses_the_template_as_rendered_independently(client: httpx.Client, model_dir: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Où est le café? 😀"}]
    ids = independent_chat_ids(model_dir, messages)
    assert ids[0] == 1 and ids.count(1) == 1  # one <s>, written by the template
    chat = ok(client.post("/v1/chat/completions", json={"messages": messages, **GREEDY}))
    plain = ok(client.post("/v1/completions", json={"prompt": ids, **GREEDY}))
    assert chat["usage"]["prompt_tokens"] == len(ids)
    content, text = chat["choices"][0]["message"]["content"], plain["choices"][0]["text"]
    assert content == (text[1:] if text.startswith(" ") else text)  # no stray leading space
    deltas, _ = stream_text(client, "/v1/chat/completions", {"messages": messages, **GREEDY})
    assert "".join(deltas) == content


def test_template_refusal_is_a_400_with_its_message(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "assistant", "content": "hi"}]})
    assert r.status_code == 400
    assert "Conversation roles must alternate" in r.json()["error"]["message"]


def _bias(ids: list[int]) -> dict[str, int]:
    return {str(i): 30 for i in ids}


@pytest.mark.parametrize("seed", [1, 2])
def test_streamed_deltas_join_to_the_plain_text(client: httpx.Client, model_dir: Path, seed: int) -> None:
    vocab = RustTokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab()
    # whole-character pieces only: valid text with multibyte characters and leading spaces
    pieces = ["é", "è", "à", "\u2581café", "\u2581déjà", "\u2581élève", "\u2581", "\u2581The"]
    whole_chars = _bias([vocab[p] for p in pieces])
    # byte-fallback pieces of "中" and "😀" (3 and 4 tokens each) and "▁": characters cut across tokens,
    # and invalid sequences that both paths must replace alike
    cut_chars = _bias([3 + b for b in "中😀".encode()] + [vocab["\u2581"]])
    for bias in (whole_chars, cut_chars):
        body = {
            "prompt": " café  中文",
            "temperature": 1.0,
            "seed": seed,
            "max_tokens": 24,
            "logit_bias": bias,
        }
        whole = ok(client.post("/v1/completions", json=body))["choices"][0]["text"]
        deltas, finish = stream_text(client, "/v1/completions", body)
        assert "".join(deltas) == whole and finish is not None  # a cut character would differ here
        if bias is whole_chars:
            assert "\ufffd" not in whole and any(ord(c) > 127 for c in whole) and " " in whole


def test_sessions_continue_a_chat(client: httpx.Client, model_dir: Path) -> None:
    earlier = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi, café?"}]
    new = [{"role": "user", "content": "And then?"}]
    ids_earlier, ids_new = independent_chat_ids(model_dir, earlier), independent_chat_ids(model_dir, new)
    assert independent_chat_ids(model_dir, earlier + new) == ids_earlier + ids_new
    sid = ok(client.post("/v1/sessions", json={"prompt": ids_earlier}), 201)["id"]
    turn = ok(client.post("/v1/chat/completions", json={"messages": new, "session_id": sid, **GREEDY}))
    whole = ok(client.post("/v1/chat/completions", json={"messages": earlier + new, **GREEDY}))
    plain = ok(client.post("/v1/completions", json={"prompt": ids_earlier + ids_new, **GREEDY}))
    assert turn["usage"]["prompt_tokens"] == len(ids_new)  # only the new turn was read
    content = turn["choices"][0]["message"]["content"]
    assert (
        content == whole["choices"][0]["message"]["content"] == plain["choices"][0]["text"].removeprefix(" ")
    )
    tokens = ok(client.get(f"/v1/sessions/{sid}"))["tokens"]
    assert tokens == len(ids_earlier) + turn["usage"]["total_tokens"]


def test_broken_template_is_a_startup_error(tmp_path: Path) -> None:
    d = build_hf_model(tmp_path / "broken", chat_template="{% for m in messages %}{{ m.content }")
    expected = r"tokenizer_config\.json chat_template is not a valid Jinja2"
    with pytest.raises(RuntimeError, match=expected), run_server({"RETSERVE_MODEL_PATH": str(d)}, timeout=60):
        pass


def test_a_session_created_from_text_starts_with_bos(client: httpx.Client, model_dir: Path) -> None:
    """A new session's text is a new sequence: it gets the BOS a stateless completion of it gets, so
    continuing the session equals completing the text alone; priming more text adds no BOS."""
    text = "Un café, s'il vous plaît"
    tok = RustTokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    sid = ok(client.post("/v1/sessions", json={"prompt": text}), 201)["id"]
    assert ok(client.get(f"/v1/sessions/{sid}"))["tokens"] == len(ids) + 1  # <s> + the text
    cont = ok(client.post(f"/v1/sessions/{sid}/generate", json=GREEDY))["choices"][0]["text"]
    assert cont == ok(client.post("/v1/completions", json={"prompt": text, **GREEDY}))["choices"][0]["text"]
    before = ok(client.get(f"/v1/sessions/{sid}"))["tokens"]
    ok(client.post(f"/v1/sessions/{sid}/prime", json={"prompt": "encore"}))
    more = len(tok.encode("encore", add_special_tokens=False).ids)
    assert ok(client.get(f"/v1/sessions/{sid}"))["tokens"] == before + more


def test_text_into_a_session_that_has_read_nothing_starts_with_bos(client: httpx.Client) -> None:
    """An empty session's first text is a new sequence too, whichever route reads it: primed, or
    generated from (equal to the stateless completion of the same text)."""
    text = "Hello, wörld"
    plain = ok(client.post("/v1/completions", json={"prompt": text, **GREEDY}))
    primed = ok(client.post("/v1/sessions", json={}), 201)["id"]
    ok(client.post(f"/v1/sessions/{primed}/prime", json={"prompt": text}))
    assert ok(client.get(f"/v1/sessions/{primed}"))["tokens"] == plain["usage"]["prompt_tokens"]
    cont = ok(client.post(f"/v1/sessions/{primed}/generate", json=GREEDY))
    assert cont["choices"][0]["text"] == plain["choices"][0]["text"]
    for route in ("/v1/sessions/{}/generate", "/v1/completions"):
        sid = ok(client.post("/v1/sessions", json={}), 201)["id"]
        body = {"prompt": text, **GREEDY} | ({"session_id": sid} if route == "/v1/completions" else {})
        out = ok(client.post(route.format(sid), json=body))
        assert out["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
        assert out["choices"][0]["text"] == plain["choices"][0]["text"]
