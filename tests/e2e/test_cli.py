"""The `retserve` command line against a real server (subprocesses, shipped model): chat through piped
standard input, continued after `/save` + `/export` exactly as an uninterrupted conversation, every
`--json` output parses, exit codes (0 ok, 1 server error, 2 usage error)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from retserve_client import Client

from tests.support.cli import json_lines, json_out, retserve
from tests.support.server import run_server
from tests.support.state import free_port

TURNS = [
    "Hello, who are you?",
    "Tell me about the king.",
    "Where does he live?",
    "What did the queen say?",
    "Goodbye, friend.",
]
GREEDY = ["-t", "0", "-n", "12"]
SYSTEM = ["--system", "You are a player in a Shakespeare comedy."]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with run_server() as u:
        yield u


def chat(url: str, lines: list[str], *args: str) -> list[dict]:
    proc = retserve(url, "chat", "--json", *GREEDY, *args, stdin="".join(line + "\n" for line in lines))
    assert proc.returncode == 0, proc.stderr
    return json_lines(proc)


def replies(events: list[dict]) -> list[str]:
    return [e["text"] for e in events if e["event"] == "turn"]


def test_chat_continues_after_save_and_export_identically(url: str, tmp_path: Path) -> None:
    whole = chat(url, TURNS, *SYSTEM)
    assert whole[0]["event"] == "session" and whole[0]["created"] is True
    expected = replies(whole)
    assert len(expected) == 5 and all(e["finish_reason"] in ("stop", "length") for e in whole[2:])
    assert len(set(expected)) > 1, expected  # the turns are answered, not one reply repeated

    blob = tmp_path / "conv.rstate"
    first = chat(url, [*TURNS[:3], "/save saved-conv", f"/export {blob}", "/quit", "never read"], *SYSTEM)
    assert replies(first) == expected[:3]
    assert [e["event"] for e in first] == ["session", "system", "turn", "turn", "turn", "save", "export"]
    assert first[5]["saved_as"] == "saved-conv" and first[6]["bytes"] == blob.stat().st_size > 0

    assert replies(chat(url, TURNS[3:], "--session", "saved-conv")) == expected[3:]
    # the exported state, imported into a new session, continues the same way (plain text output)
    proc = retserve(
        url, "chat", *GREEDY, "--session", "from-file", stdin=f"/import {blob}\n" + "\n".join(TURNS[3:])
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "".join(r.lstrip() + "\n" for r in expected[3:])
    assert "imported" in proc.stderr


def test_chat_with_the_servers_template(url: str) -> None:
    """--template server: /v1/chat/completions on the session applies the model's chat format (here the
    plain one); the first reply is a stateless chat's, and the session holds every token of both turns."""
    events = chat(url, TURNS[:2], "--template", "server", *SYSTEM)
    turns = [e for e in events if e["event"] == "turn"]
    messages = [{"role": "system", "content": SYSTEM[1]}, {"role": "user", "content": TURNS[0]}]
    with Client(url) as client:
        assert turns[0]["text"] == client.chat(messages, temperature=0, max_tokens=12).text
        tokens = client.get_session(events[0]["session"]).tokens
    assert tokens == sum(t["usage"]["prompt_tokens"] + t["usage"]["completion_tokens"] for t in turns)


def test_chat_commands(url: str, tmp_path: Path) -> None:
    lines = [
        "Hi there.",
        "/stats",
        "/fork",
        "/load nobody-has-this",
        "/reset",
        "/stats",
        "/nope",
        "/save",
        "//x",
    ]
    proc = retserve(url, "chat", "--json", *GREEDY, "--session", "cmds", stdin="\n".join(lines))
    assert proc.returncode == 2, proc.stderr  # the worst failure: a usage error (after a 404)
    events = json_lines(proc)
    kinds = [e["event"] for e in events]
    assert kinds == ["session", "turn", "stats", "fork", "error", "reset", "stats", "error", "error", "turn"]
    stats = events[2]
    assert stats["tokens"] > 0 and stats["stats"]["num_layers"] == len(stats["stats"]["state_norms"])
    fork = events[3]
    assert fork["forked_from"] == "cmds" and fork["session"] != "cmds"
    assert events[4]["error"]["status"] == 404
    assert events[6]["session"] == fork["session"] and events[6]["tokens"] == 0  # /reset emptied the fork
    assert events[7]["error"]["type"] == "usage_error" and "/help" in events[7]["error"]["message"]
    assert events[9]["usage"]["prompt_tokens"] > 0  # "//x" is a turn, not a command
    # the original session kept its turn; a server error alone exits 1, a bad command 2
    assert json_out(retserve(url, "sessions", "show", "cmds", "--json"))["tokens"] == stats["tokens"]
    proc = retserve(url, "chat", "--session", "cmds", stdin="/load nobody-has-this\n")
    assert proc.returncode == 1 and "nobody-has-this" in proc.stderr
    proc = retserve(url, "chat", "--session", "cmds", stdin="/export\n")
    assert proc.returncode == 2 and "usage: /export FILE" in proc.stderr


def test_json_outputs_parse(url: str, tmp_path: Path) -> None:
    health = json_out(retserve(url, "health", "--json"))
    assert health["status"] == "ok" and health["models"] == ["retserve-small"]
    done = json_out(retserve(url, "complete", "Once upon a time", *GREEDY, "--json"))
    assert done["object"] == "text_completion" and done["usage"]["completion_tokens"] == 12
    streamed = retserve(url, "complete", "-", *GREEDY, stdin="Once upon a time")
    assert streamed.returncode == 0 and streamed.stdout == done["choices"][0]["text"] + "\n"

    retserve(url, "chat", *GREEDY, "--session", "js", stdin="Hello.\n")
    shown = json_out(retserve(url, "sessions", "show", "js", "--stats", "--json"))
    assert shown["id"] == "js" and shown["stats"]["tokens"] == shown["tokens"] > 0
    forked = json_out(retserve(url, "sessions", "fork", "js", "js-copy", "--json"))
    assert forked["id"] == "js-copy" and forked["tokens"] == shown["tokens"]
    cont = json_out(retserve(url, "complete", "", "--session", "js-copy", *GREEDY, "--json"))
    assert cont["session_id"] == "js-copy" and cont["usage"]["prompt_tokens"] == 0
    listed = json_out(retserve(url, "sessions", "ls", "--json"))
    assert {"js", "js-copy"} <= {s["id"] for s in listed["data"]}
    blob = tmp_path / "js.rstate"
    exported = json_out(retserve(url, "sessions", "export", "js", str(blob), "--json"))
    assert exported["bytes"] == blob.stat().st_size
    imported = json_out(retserve(url, "sessions", "import", "js-imported", str(blob), "--json"))
    assert imported["id"] == "js-imported" and imported["tokens"] == shown["tokens"]
    removed = json_out(retserve(url, "sessions", "rm", "js", "js-copy", "js-imported", "--json"))
    assert removed == {"deleted": ["js", "js-copy", "js-imported"]}
    text = retserve(url, "sessions", "ls")
    assert text.returncode == 0 and "js-copy" not in text.stdout


def test_exit_codes(url: str, tmp_path: Path) -> None:
    missing = retserve(url, "sessions", "show", "no-such-session", "--json")
    assert missing.returncode == 1 and json.loads(missing.stdout)["error"]["status"] == 404
    assert "no-such-session" in missing.stderr
    for args in (
        ["sessions", "show"],  # a missing argument
        ["chat", "--temperature", "-1"],  # out of range
        ["complete", "hi", "--nope"],  # an unknown option
        ["prime", str(tmp_path / "absent.txt"), "--session", "x"],  # a missing file
        ["sessions", "import", "x", str(tmp_path / "absent.rstate")],
        ["complete", ""],  # nothing to complete
    ):
        proc = retserve(url, *args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.strip(), args
    bad = retserve("ftp://example", "health")
    assert bad.returncode == 2 and "http://" in bad.stderr
    down = retserve(f"http://127.0.0.1:{free_port()}", "health", "--json")
    assert down.returncode == 1 and json.loads(down.stdout)["error"]["type"] == "APIConnectionError"
    not_state = tmp_path / "junk.rstate"
    not_state.write_bytes(b"not a state")
    junk = retserve(url, "sessions", "import", "junk", str(not_state))
    assert junk.returncode == 1 and "invalid_state" in junk.stderr
    assert retserve(url, "--help").returncode == 0
