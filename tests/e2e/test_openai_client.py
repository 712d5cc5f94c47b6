"""The official `openai` Python SDK works against the server unchanged: completions and chat, plain and
streamed, logprobs, usage in streams, extensions via extra_body, and errors as typed exceptions."""

from __future__ import annotations

import pytest

from tests.support.server import run_server

openai = pytest.importorskip("openai")  # a dev dependency

KEY = "sk-test-key-123456"


@pytest.fixture(scope="module")
def client():
    with run_server({"RETSERVE_API_KEYS": f'{{"{KEY}": "t1"}}'}) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)


def test_models_and_completions(client):
    assert [m.id for m in client.models.list()] == ["retserve-small"]
    r = client.completions.create(
        model="retserve-small", prompt="The king", max_tokens=5, temperature=0, logprobs=2
    )
    c = r.choices[0]
    assert c.finish_reason == "length" and r.usage.completion_tokens == 5
    assert "".join(c.logprobs.tokens) == c.text and len(c.logprobs.top_logprobs[0]) == 2
    chunks = list(
        client.completions.create(
            model="retserve-small",
            prompt="The king",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert chunks[-1].usage.completion_tokens == 5 and not chunks[-1].choices


def test_chat_plain_and_streamed(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(
        model="retserve-small", messages=msgs, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    m = r.choices[0]
    assert m.message.role == "assistant" and r.usage.completion_tokens <= 6
    assert all(len(t.top_logprobs) == 2 for t in m.logprobs.content)
    s = client.chat.completions.create(
        model="retserve-small", messages=msgs, max_tokens=6, temperature=0, stream=True
    )
    deltas = [ch.choices[0].delta.content or "" for ch in s if ch.choices]
    assert "".join(deltas) == m.message.content


def test_extensions_and_errors(client):
    r = client.completions.create(
        model="retserve-small",
        prompt="The",
        max_tokens=4,
        temperature=0,
        extra_body={"top_k": 1, "min_tokens": 4},
    )
    assert r.usage.completion_tokens == 4
    with pytest.raises(openai.NotFoundError, match="session 'nope' not found"):
        client.completions.create(
            model="retserve-small", prompt="x", max_tokens=2, extra_body={"session_id": "nope"}
        )
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="retserve-small", prompt="x", max_tokens=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=str(client.base_url), api_key="wrong-key-000", max_retries=0).models.list()
