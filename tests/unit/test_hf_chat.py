"""Chat templates: rendered like transformers (sandboxed Jinja2), errors at load or as 400s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.chat_template import ChatTemplate, ChatTemplateError, ChatTemplateRenderError, load_chat_template
from model.tokenizer import load_tokenizer
from server.chat import CHAT_STOP, load_chat_format
from server.errors import APIError
from server.protocol import ChatMessage
from tests.support.hf_model import LLAMA2_CHAT_TEMPLATE, build_hf_model

SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("hf") / "m")


def test_llama2_template_renders_as_expected() -> None:
    t = ChatTemplate(LLAMA2_CHAT_TEMPLATE, SPECIALS)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    assert t.render(msgs) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello. </s><s>[INST] Bye [/INST]"
    )
    with pytest.raises(ChatTemplateRenderError, match="Conversation roles must alternate"):
        t.render([{"role": "assistant", "content": "x"}])


def test_add_generation_prompt_and_tojson() -> None:
    t = ChatTemplate(CHATML + "{{ messages[0]['content'] | tojson }}", SPECIALS)
    msgs = [{"role": "user", "content": "héllo"}]
    assert t.render(msgs).endswith('<|im_start|>assistant\n"héllo"')
    assert "assistant\n" not in t.render(msgs, add_generation_prompt=False)


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        ("{% for m in messages %}{{ m.content }", ChatTemplateError, "not a valid Jinja2 template: line 1"),
        ("{{ raise_exception('no user turns here') }}", ChatTemplateError, "no user turns here"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ChatTemplateError, "cannot render"),
    ],
)
def test_broken_templates_fail_at_load(source: str, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ChatTemplate(source, SPECIALS, where="tokenizer_config.json chat_template")


def test_sandbox_refuses_mutation_at_render() -> None:
    t = ChatTemplate("{% if messages | length > 1 %}{{ messages.append(1) }}{% endif %}ok", SPECIALS)
    with pytest.raises(ChatTemplateRenderError, match="chat template failed"):
        t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_template_file_forms(tmp_path: Path) -> None:
    assert load_chat_template(tmp_path, SPECIALS) is None
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "x"},
                    {"name": "default", "template": CHATML},
                ]
            }
        )
    )
    assert "<|im_start|>user" in load_chat_template(tmp_path, SPECIALS).render(
        [{"role": "user", "content": "a"}]
    )
    cfg.write_text(json.dumps({"chat_template": 3}))
    with pytest.raises(ChatTemplateError, match=r"tokenizer_config\.json chat_template must be a string"):
        load_chat_template(tmp_path, SPECIALS)
    cfg.write_text(json.dumps({}))
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    assert load_chat_template(tmp_path, SPECIALS) is not None


def test_chat_format_of_the_fixture(model_dir: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(model_dir)
    fmt = load_chat_format(model_dir, tok, model_eos=2)
    assert (
        fmt.template is not None and fmt.stop == [] and fmt.stop_token_ids == [] and fmt.strip_leading_space
    )
    msgs = [ChatMessage(role="developer", content="Sys"), ChatMessage(role="user", content="Hi")]
    ids = fmt.prompt_ids(msgs, new_sequence=True)
    assert ids == tok.encode("<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST]", allow_special=True)
    with pytest.raises(APIError) as e:
        fmt.prompt_ids([ChatMessage(role="assistant", content="x")], new_sequence=True)
    assert e.value.status == 400 and "roles must alternate" in e.value.message
    gen = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": [2, 0]}))
    try:
        assert load_chat_format(model_dir, tok, model_eos=2).stop_token_ids == [0]
    finally:
        (model_dir / "generation_config.json").write_text(json.dumps(gen))


def test_plain_format_without_template(model_dir: Path) -> None:
    d = build_hf_model(model_dir.parent / "plain", chat_template=None)
    tok = load_tokenizer(d)
    fmt = load_chat_format(d, tok, model_eos=2)
    assert fmt.template is None and fmt.stop == CHAT_STOP
    ids = fmt.prompt_ids([ChatMessage(role="user", content="Hi")], new_sequence=True)
    assert ids == [1, *tok.encode("User: Hi\n\nAssistant:")]  # BOS for a new sequence (add_bos_token)
    assert fmt.prompt_ids([ChatMessage(role="user", content="Hi")], new_sequence=False) == ids[1:]
