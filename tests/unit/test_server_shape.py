"""The server package stays small: no file over 300 lines, no function over 60 (measured with ast)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 60


def _server_files() -> list[Path]:
    return sorted((ROOT / "server").rglob("*.py"))


def test_no_server_file_over_300_lines():
    long = [
        f"{f.relative_to(ROOT)}: {n} lines"
        for f in _server_files()
        if (n := len(f.read_text().splitlines())) > MAX_FILE_LINES
    ]
    assert not long, "split these modules:\n" + "\n".join(long)


def test_no_server_function_over_60_lines():
    long = []
    for f in _server_files():
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1  # decorators excluded, docstring included
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "split these functions:\n" + "\n".join(long)


def test_the_checks_see_the_server():
    """The walk finds the package (an empty glob would pass both checks)."""
    names = {f.relative_to(ROOT).as_posix() for f in _server_files()}
    assert {"server/app.py", "server/generation.py", "server/session_service.py"} <= names
