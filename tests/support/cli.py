"""Run the installed `retserve` command line (the entry point next to this Python) as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

RETSERVE = Path(sys.executable).with_name("retserve")


def retserve(
    url: str, *args: str, stdin: str | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """`retserve --url URL ARGS...`, its output captured (text); standard input from `stdin` (else none)."""
    assert RETSERVE.exists(), f"{RETSERVE} is missing: pip install -e ./clients/python"
    return subprocess.run(
        [str(RETSERVE), "--url", url, *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
    )


def json_out(proc: subprocess.CompletedProcess[str]) -> Any:
    """The one JSON document a `--json` command printed (after checking it succeeded)."""
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def json_lines(proc: subprocess.CompletedProcess[str]) -> list[dict]:
    """The JSON lines of `retserve chat --json`."""
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
