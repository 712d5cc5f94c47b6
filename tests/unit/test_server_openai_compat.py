"""OpenAI compatibility at the request boundary (the app in-process, the official SDK on top of it):
chat content as a list of text parts, strict JSON types (no "yes" for a boolean, no "0.5" for a
number), OpenAI's top_logprobs rule, and an OpenAPI document that says what the server really does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings

openai = pytest.importorskip("openai")  # a dev dependency

KEY = "key-compat-123456"
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = create_app(Settings(api_keys={KEY: "compat"}, num_threads=1))
    with TestClient(app, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(client: TestClient) -> Any:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=KEY, http_client=client, max_retries=0)


def error_of(r: Any, status: int = 400) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


# ---- chat content parts -----------------------------------------------------------------------------
def test_chat_content_as_text_parts(client: TestClient, sdk: Any) -> None:
    """The SDKs send `content` as a list of parts: text parts are read (joined by newlines)."""
    greedy = {"max_tokens": 5, "temperature": 0, "ignore_eos": True}
    plain = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi\nthere"}], **greedy}
    )
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    listed = client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": parts}], **greedy}
    )
    assert plain.status_code == 200 and listed.status_code == 200, (plain.text, listed.text)
    assert listed.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
    assert listed.json()["usage"] == plain.json()["usage"]
    r = sdk.chat.completions.create(
        model="retserve-small",
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        max_tokens=3,
        temperature=0,
    )
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 3


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
        [
            {"type": "text", "text": "look"},
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
        ],
        [{"type": "refusal", "refusal": "no"}],
    ],
    ids=["image", "audio-after-text", "refusal"],
)
def test_chat_non_text_parts_are_a_clear_400(client: TestClient, content: list) -> None:
    err = error_of(
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]})
    )
    assert "text" in err["message"] and content[-1]["type"] in err["message"], err
    assert err["param"] and err["param"].startswith("messages.0.content"), err


@pytest.mark.parametrize(
    "content", [[], [{"type": "text"}], [{"text": "no type"}], [{"type": "text", "text": 5}], ["hi"], None, 5]
)
def test_chat_malformed_content_is_400(client: TestClient, content: Any) -> None:
    error_of(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]}))


# ---- strict types -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "field", "value"),
    [
        ("/v1/completions", "stream", "yes"),
        ("/v1/completions", "stream", "true"),
        ("/v1/completions", "stream", 1),
        ("/v1/chat/completions", "stream", "yes"),
        ("/v1/completions", "ignore_eos", "false"),
        ("/v1/completions", "stream_options", {"include_usage": "yes"}),
        ("/v1/completions", "temperature", "0.5"),
        ("/v1/completions", "top_p", "1"),
        ("/v1/completions", "presence_penalty", "0"),
        ("/v1/completions", "min_p", True),
        ("/v1/completions", "max_tokens", "5"),
        ("/v1/completions", "max_tokens", 5.5),
        ("/v1/completions", "seed", 2**53),
        ("/v1/completions", "logprobs", True),
        ("/v1/completions", "seed", "7"),
        ("/v1/completions", "logit_bias", {"5": "1.5"}),
        ("/v1/completions", "stop_token_ids", ["3"]),
        ("/v1/completions", "user", 5),
        ("/v1/chat/completions", "logprobs", "true"),
        ("/v1/chat/completions", "logprobs", 1),
        ("/v1/chat/completions", "top_logprobs", "2"),
    ],
)
def test_no_coercion_of_strings_and_numbers(client: TestClient, path: str, field: str, value: Any) -> None:
    body = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": HI}
    err = error_of(client.post(path, json={**body, "max_tokens": 1, field: value}))
    assert err["param"] and err["param"].split(".")[0] == field, err


def test_strict_types_still_take_ints_for_floats(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "temperature": 0, "top_p": 1})
    assert r.status_code == 200, r.text
    # and JSON Schema's integers: 2.0 is the integer 2 (the OpenAPI document says "integer")
    r = client.post("/v1/completions", json={"prompt": [5.0, 6], "max_tokens": 2.0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "total_tokens": 4,
    }


def test_chat_max_tokens_and_max_completion_tokens_must_agree(client: TestClient) -> None:
    body = {"messages": HI, "max_completion_tokens": 1, "max_tokens": 100}
    assert "differ" in error_of(client.post("/v1/chat/completions", json=body))["message"]
    r = client.post("/v1/chat/completions", json={**body, "max_tokens": 1})
    assert r.status_code == 200, r.text


# ---- logprobs rules ---------------------------------------------------------------------------------
def test_top_logprobs_needs_logprobs(client: TestClient) -> None:
    """OpenAI chat: `logprobs` must be true when `top_logprobs` is used (completions have no
    top_logprobs at all: their `logprobs` is the number of alternatives)."""
    for extra in ({"top_logprobs": 2}, {"top_logprobs": 0}, {"top_logprobs": 2, "logprobs": False}):
        err = error_of(client.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 1, **extra}))
        assert err["param"] == "top_logprobs" and "logprobs" in err["message"], err
    r = client.post(
        "/v1/chat/completions", json={"messages": HI, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    )
    assert r.status_code == 200, r.text
    assert all(len(t["top_logprobs"]) == 2 for t in r.json()["choices"][0]["logprobs"]["content"])
    err = error_of(client.post("/v1/completions", json={"prompt": "Hi", "top_logprobs": 2}))
    assert err["param"] == "top_logprobs", err


# ---- the OpenAPI document ---------------------------------------------------------------------------
def operations(doc: dict) -> Iterator[tuple[str, str, dict]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield method.upper(), path, op


def test_openapi_says_what_the_server_does(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    ops = {(m, p): op for m, p, op in operations(doc)}
    for (method, path), op in ops.items():
        codes = set(op["responses"])
        assert "422" not in codes, (method, path)
        if op.get("parameters") or op.get("requestBody"):
            assert "400" in codes, (method, path)
        for code in codes - {"200", "201"} - ({"503"} if path == "/ready" else set()):
            schema = op["responses"][code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, code)
        if path.startswith("/v1/"):
            assert {"401", "429", "503"} <= codes, (method, path, codes)
            assert op.get("security") == [{"bearerAuth": []}], (method, path)
        if "{session_id}" in path:
            assert {"404", "409"} <= codes or (method == "GET" and path.endswith("}")), (method, path, codes)
    json_body_ops = [
        (m, p)
        for (m, p), op in ops.items()
        if "application/json" in op.get("requestBody", {}).get("content", {})
    ]
    assert len(json_body_ops) == 7, json_body_ops
    for key in json_body_ops:
        assert {"413", "415"} <= set(ops[key]["responses"]), key
    for key in [
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/sessions/{session_id}/generate"),
    ]:
        content = ops[key]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= set(content), key
    put_state = ops[("PUT", "/v1/sessions/{session_id}/state")]
    assert list(put_state["requestBody"]["content"]) == ["application/octet-stream"]
    assert put_state["requestBody"]["required"] is True
    assert {"413", "503"} <= set(put_state["responses"])
    assert (
        "application/octet-stream"
        in ops[("GET", "/v1/sessions/{session_id}/state")]["responses"]["200"]["content"]
    )
    assert "text/plain" in ops[("GET", "/metrics")]["responses"]["200"]["content"]
    assert "503" in ops[("GET", "/ready")]["responses"]
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {"type": "http", "scheme": "bearer"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    # the document matches what the server answers: a bad body is a 400, not the 422 FastAPI documents
    assert client.post("/v1/completions", json={"prompt": 5}).status_code == 400
