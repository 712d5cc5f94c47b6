"""The plain-text chat template for base models (documented in the README).

    System: {content}\n\n
    User: {content}\n\n
    Assistant: {content}\n\n
    ...
    Assistant:

The completion is the assistant's reply; it stops before the model starts a new "User:" or
"System:" turn (those are added to the request's stop strings). With `session_id`, send only the
new messages: the session's state already holds the earlier turns. A message's `content` is a string
or a list of text parts (OpenAI's format), joined by newlines.
"""

from __future__ import annotations

from server.protocol import ChatMessage

ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\nUser:", "\nSystem:"]


def render_chat(messages: list[ChatMessage]) -> str:
    turns = [f"{ROLES[m.role]}: {m.text().strip()}\n\n" for m in messages]
    return "".join(turns) + "Assistant:"
