"""The README's curl examples work as written (against a server on a free port instead of 8000)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tests.support.server import ROOT, run_server


def readme_block(section: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("```bash", text.index(section)) + len("```bash")
    return text[start : text.index("```", start)]


def test_readme_curl_examples(tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    block = readme_block("## HTTP server")
    assert "127.0.0.1:8000" in block
    with run_server() as url:
        script = "set -euo pipefail\n" + block.replace("http://127.0.0.1:8000", url)
        out = subprocess.run(
            ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
    assert out.returncode == 0, out.stderr
    stream, _, rest = out.stdout.partition("data: [DONE]")
    events = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")]
    assert events and events[-1]["choices"][0]["finish_reason"] == "length"
    assert '"object":"session.deleted"' in rest
    final = json.loads(rest[rest.rindex('{"id":"cmpl-') :])
    assert final["session_id"] == "moby" and final["usage"]["completion_tokens"] == 16
    assert (tmp_path / "moby.rstate").stat().st_size > 0
