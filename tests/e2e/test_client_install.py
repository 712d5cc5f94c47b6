"""retserve-client installs on its own: `pip install ./clients/python` into a fresh, plain venv (httpx, typer
and rich from the package index), then `import retserve_client` works, pulls in no torch or server code,
and talks to a real server; so does its `retserve` command. Slow (a venv and a download): `-m slow`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.server import run_server

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = ("NewConnectionError", "Could not find a version that satisfies", "Temporary failure in name")

CHECK = """
import importlib.util, json, sys
import retserve_client
from retserve_client import Client
with Client(sys.argv[1]) as c:
    greedy = {"max_tokens": 4, "temperature": 0}
    out = c.completions("Once upon a time", **greedy)
    streamed = "".join(ch.text for ch in c.completions("Once upon a time", stream=True, **greedy))
print(json.dumps({
    "file": retserve_client.__file__,
    "torch_installed": importlib.util.find_spec("torch") is not None,
    "project_modules": sorted(
        m for m in sys.modules if m.split(".")[0] in ("torch", "model", "server", "state_store")
    ),
    "completion_tokens": out.usage.completion_tokens,
    "same": streamed == out.text,
}))
"""


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT / "clients" / "python", src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if pip.returncode != 0 and any(s in pip.stdout + pip.stderr for s in OFFLINE):
        pytest.skip(f"the package index is unreachable from here: {pip.stderr[-300:]}")
    assert pip.returncode == 0, pip.stdout + pip.stderr
    cli = venv / "bin" / "retserve"
    helped = subprocess.run([str(cli), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert helped.returncode == 0 and "chat" in helped.stdout and "prime" in helped.stdout, helped.stderr
    with run_server() as url:
        out = subprocess.run(
            [str(py), "-c", CHECK, url], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        health = subprocess.run(
            [str(cli), "--url", url, "health", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    assert out.returncode == 0, out.stderr
    assert health.returncode == 0 and json.loads(health.stdout)["status"] == "ok", health.stderr
    got = json.loads(out.stdout)
    assert got["file"].startswith(str(venv)), got  # the installed copy, not the source tree
    assert got["torch_installed"] is False and got["project_modules"] == []
    assert got["completion_tokens"] == 4 and got["same"] is True
