"""How the CLI prints: results to stdout (text, or one JSON document with `--json`), messages, prompts
and progress to stderr, so `retserve ... > file` keeps only the result."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from retserve_client.errors import RetserveError
from retserve_client.types import Session


class UsageProblem(Exception):
    """A bad input the user can fix (missing file, wrong option value, inconsistent resume): exit 2."""


class Output:
    """The two streams of one command; `as_json` turns results into JSON documents."""

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json
        self.out = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        self.err = Console(file=sys.stderr, highlight=False, soft_wrap=True)
        global current
        current = self

    def document(self, obj: Any) -> None:
        """One JSON document (one line) on stdout."""
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def text(self, s: str) -> None:
        """Plain text on stdout, as is (no markup, no wrapping)."""
        sys.stdout.write(s)
        sys.stdout.flush()

    def info(self, message: str) -> None:
        """A message for the person at the terminal (stderr); `message` is plain text."""
        self.err.print(escape(message), style="dim")

    def warn(self, message: str) -> None:
        self.err.print(escape(message), style="yellow")

    def error(self, message: str) -> None:
        self.err.print(f"[bold red]error:[/] {escape(message)}")

    def table(self, table: Table) -> None:
        self.out.print(table)


current: Output | None = None  # the running command's output (main() reports errors through it)


def error_json(err: BaseException) -> dict[str, Any]:
    """`{"error": {...}}` for a failure, in the server's error object shape."""
    if isinstance(err, RetserveError):
        detail = {"message": err.message, "status": err.status, "code": err.code, "param": err.param}
        return {"error": {**detail, "type": err.type or type(err).__name__}}
    return {"error": {"message": str(err), "type": "usage_error"}}


def report(err: BaseException) -> None:
    """Tell the user about a failure: stderr always, and the JSON error document on stdout with --json."""
    out = current or Output()
    out.error(str(err))
    if out.as_json:
        out.document(error_json(err))


def size(n: int) -> str:
    """Bytes for people: 1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def sessions_table(sessions: list[Session]) -> Table:
    """id, tokens, size, version, expiry; and where each came from when any says."""
    origins = [
        ", ".join(f"{k}={v}" for k, v in s.provenance.items() if k.endswith("_from") and v) for s in sessions
    ]
    table = Table(box=None, header_style="bold")
    for col in ("id", "tokens", "size", "version", "expires in", *(["from"] if any(origins) else [])):
        table.add_column(col, justify="right" if col in ("tokens", "size", "version") else "left")
    for s, origin in zip(sessions, origins, strict=True):
        expires = "never" if s.expires_in is None else f"{s.expires_in:.0f} s"
        row = [escape(s.id), f"{s.tokens:,}", size(s.size_bytes), str(s.version), expires]
        table.add_row(*row, *([escape(origin)] if any(origins) else []))
    return table


def session_lines(s: Session) -> list[str]:
    """`key: value` lines describing one session."""
    expires = "never" if s.expires_in is None else f"{s.expires_in:.0f} s"
    lines = [
        f"id: {s.id}",
        f"tokens: {s.tokens:,}",
        f"size: {size(s.size_bytes)} ({s.size_bytes} bytes)",
        f"version: {s.version}",
        f"model: {s.model}",
        f"dtype: {s.dtype}",
        f"expires in: {expires}",
    ]
    lines += [f"{k}: {v}" for k, v in s.provenance.items() if v not in (None, [], {}, "")]
    return lines
