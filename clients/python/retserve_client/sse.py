"""A minimal Server-Sent Events parser: the server sends `data: {json}` events, then `data: [DONE]`."""

from __future__ import annotations

DONE = "[DONE]"


class SSEParser:
    """Feed it lines (without their line ending); it returns each event's data when the event ends.

    Multi-line data is joined with newlines (the SSE rule); comments (`:`) and other fields (`event:`,
    `id:`, `retry:`) are ignored.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """The data of the event `line` ends (a blank line), else None."""
        line = line.rstrip("\r")
        if not line:
            if not self._data:
                return None
            data, self._data = "\n".join(self._data), []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> str | None:
        """The data of an event the stream ended without a blank line after (else None)."""
        return self.feed("")
