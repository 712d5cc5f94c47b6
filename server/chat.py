"""How /v1/chat/completions turns messages into a prompt: the model's chat template, or the plain one.

A model directory whose `tokenizer_config.json` has a `chat_template` (see model/chat_template.py) is
prompted with it: rendered with `add_generation_prompt`, special tokens in the rendering (`<s>`, ...)
are tokens, and the completion stops at the model's end-of-sequence tokens (`eos_token_id` of
`generation_config.json` too). A template that refuses a conversation is a 400 with its message. The
`developer` role is given to templates as `system`.

Otherwise, the plain-text template for base models (documented in the README):

    System: {content}\n\n
    User: {content}\n\n
    Assistant: {content}\n\n
    ...
    Assistant:

The completion is the assistant's reply; it stops before the model starts a new "User:" or
"System:" turn (those are added to the request's stop strings). With `session_id`, send only the
new messages: the session's state already holds the earlier turns. A message's `content` is a string
or a list of text parts (OpenAI's format), joined by newlines.

With a tokenizer whose decoder drops the space its `▁` prefix stands for (Llama's), the reply's one
leading space (the model writes "▁Sure") is dropped too, as `tokenizer.decode` of the reply would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from model.chat_template import ChatTemplate, ChatTemplateRenderError, load_chat_template
from model.tokenizer import TextTokenizer
from server.errors import APIError
from server.protocol import ChatMessage

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\nUser:", "\nSystem:"]


def render_chat(messages: list[ChatMessage]) -> str:
    turns = [f"{ROLES[m.role]}: {m.text().strip()}\n\n" for m in messages]
    return "".join(turns) + "Assistant:"


@dataclass
class ChatFormat:
    """The chat prompt of one served model."""

    tokenizer: TextTokenizer
    template: ChatTemplate | None = None
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's eos_token_id

    @property
    def stop(self) -> list[str]:
        return [] if self.template is not None else list(CHAT_STOP)

    @property
    def strip_leading_space(self) -> bool:
        return self.tokenizer.strips_leading_space

    def prompt_ids(self, messages: list[ChatMessage], new_sequence: bool) -> list[int]:
        """Token ids of the prompt (APIError 400 if the template refuses the conversation). A new
        sequence (no session state before it) starts with the tokenizer's BOS when it adds one and
        the template does not write it."""
        if self.template is None:
            prefix = self.tokenizer.prompt_prefix if new_sequence else []
            return prefix + self.tokenizer.encode(render_chat(messages))
        convo = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages
        ]
        try:
            text = self.template.render(convo, add_generation_prompt=True)
        except ChatTemplateRenderError as e:
            raise APIError(
                400, f"the model's chat template refused these messages: {e}", param="messages"
            ) from None
        return self.tokenizer.encode(text, allow_special=True)


def load_chat_format(model_dir: Path, tokenizer: TextTokenizer, model_eos: int | None) -> ChatFormat:
    """The chat format of a model directory (ChatTemplateError for a broken template)."""
    specials = {
        role: getattr(tokenizer, role, None) for role in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    template = load_chat_template(model_dir, specials)
    stops: list[int] = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    gen_file = model_dir / "generation_config.json"
    if template is not None and gen_file.is_file():
        try:
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            eos = None
        stops += [e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int) and e >= 0]
    ids = sorted({s for s in stops if s != model_eos and s < tokenizer.vocab_size})
    return ChatFormat(tokenizer, template, ids if template is not None else [])
