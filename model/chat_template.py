"""Chat templates from `tokenizer_config.json` (`chat_template`), rendered as transformers renders them.

Jinja2 in an `ImmutableSandboxedEnvironment` (templates are data from a model directory: they cannot
reach Python objects or mutate what they are given) with `trim_blocks` and `lstrip_blocks`, the
`raise_exception` and `strftime_now` globals and a `tojson` filter that keeps non-ASCII text. The
variables are `messages` (role/content dicts), `add_generation_prompt`, `bos_token`, `eos_token`,
`unk_token` and `pad_token`. A template that does not compile, or fails on a one-message conversation,
is a `ChatTemplateError` when the model is loaded; one that raises for a given conversation (e.g. roles
out of order) is a `ChatTemplateRenderError` with the template's own message.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The model directory's chat template is unusable (a startup error)."""


class ChatTemplateRenderError(ValueError):
    """The template refused this conversation (a client error: the message is the template's)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateRenderError(str(message))


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template and the special-token strings it is rendered with."""

    def __init__(
        self, source: str, special_tokens: dict[str, str | None], where: str = "chat_template"
    ) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(
                f"{where} is not a valid Jinja2 template: line {e.lineno}: {e.message}"
            ) from None
        self.source = source
        self.where = where
        self.special_tokens = {k: v or "" for k, v in special_tokens.items()}
        try:
            self.render([{"role": "user", "content": "Hello"}])
        except ChatTemplateRenderError as e:
            raise ChatTemplateError(f"{where} cannot render a one-message conversation: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages` (ChatTemplateRenderError if the template refuses them)."""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except ChatTemplateRenderError:
            raise
        except jinja2.TemplateError as e:  # undefined variables, sandbox violations, bad operations
            raise ChatTemplateRenderError(f"the chat template failed: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
            raise ChatTemplateRenderError(f"the chat template failed: {type(e).__name__}: {e}") from None


def _pick(value: Any, where: str) -> str | None:
    """`chat_template` is a string or a list of {"name", "template"} (the "default" one is used)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        if isinstance(chosen, str):
            return chosen
    raise ChatTemplateError(
        f"{where} must be a string or a list with a 'default' template, got {value!r:.200}"
    )


def load_chat_template(model_dir: str | Path, special_tokens: dict[str, str | None]) -> ChatTemplate | None:
    """The chat template of a model directory (`tokenizer_config.json`, else `chat_template.jinja`), or
    None when it has none."""
    d = Path(model_dir)
    jinja_file = d / "chat_template.jinja"
    cfg_file = d / CONFIG_FILE
    source: str | None = None
    where = ""
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ChatTemplateError(f"{cfg_file} is not valid UTF-8 JSON: {e}") from None
        where = f"{cfg_file} chat_template"
        source = _pick(cfg.get("chat_template") if isinstance(cfg, dict) else None, where)
    if source is None and jinja_file.is_file():
        where = str(jinja_file)
        source = jinja_file.read_text(encoding="utf-8")
    return None if source is None else ChatTemplate(source, special_tokens, where)
