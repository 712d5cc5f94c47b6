"""`retserve chat`: a conversation whose memory is a server session.

Each turn sends only the new text, in the server's plain chat template (server/chat.py):

    System: {system}\\n\\n          (once, with --system)
    User: {line}\\n\\nAssistant:   (each turn; "\\n\\n" before it when the state ends on a reply)

and generates on the session with the template's stop strings ("\\nUser:", "\\nSystem:"). The server
saves the state with exactly the prompt and the reply's tokens (the text it streamed), so the session
holds the whole conversation and the next turn continues it; `/save`, `/export` and a later
`retserve chat --session` (or `/import`) continue it exactly.

Reads one turn per line from standard input (a terminal or a pipe); lines starting with "/" are
commands (`/help`; "//" sends a line that starts with "/"). Replies stream to stdout; messages go to
stderr. With --json each turn and command prints one JSON line (`{"event": "turn", "text": ...}`).
`--template server` sends the turns to /v1/chat/completions with the session instead, so the server
applies the model's own chat template (a Hugging Face model directory's).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from retserve_client.cli.app import JsonOpt, app, connection
from retserve_client.cli.commands import MaxTokens, Seed, Temperature, sampling
from retserve_client.cli.output import Output, UsageProblem, error_json, size
from retserve_client.cli.sessions import read_blob, stats_lines, write_blob
from retserve_client.errors import NotFound, RetserveError, SessionBusy
from retserve_client.sync_client import Client, Stream
from retserve_client.types import Session

T = TypeVar("T")
CHAT_STOP = ["\nUser:", "\nSystem:"]  # what the server's chat template adds to the stop strings
SEPARATOR = "\n\n"  # ends every turn of the template; a reply is saved without it
COMMANDS = {
    "/save NAME": "copy this conversation to session NAME (a fork; you stay here)",
    "/load NAME": "continue in session NAME",
    "/fork": "continue in a copy of this session (random id; this one stays as it is)",
    "/export FILE": "write this session's state to FILE",
    "/import FILE": "replace this session's state with FILE's",
    "/reset": "forget everything (the session starts empty; the --system text is read again)",
    "/stats": "tokens read, state bytes, the state's norms",
    "/quit": "leave (end of input does too)",
    "//text": "send a line that starts with '/'",
}


def user_turn(text: str, after_reply: bool) -> str:
    return (SEPARATOR if after_reply else "") + f"User: {text.strip()}{SEPARATOR}Assistant:"


def system_turn(text: str, after_reply: bool) -> str:
    return (SEPARATOR if after_reply else "") + f"System: {text.strip()}{SEPARATOR}"


class Chat:
    """One conversation: the current session, what its state ends with, and the slash commands."""

    def __init__(
        self, client: Client, out: Output, system: str | None, params: dict[str, Any], template: str
    ) -> None:
        self.client = client
        self.out = out
        self.system = system
        self.template = template
        self.system_pending = False  # --template server: the system text goes with the next user line
        self.params = {**params, "stream_options": {"include_usage": True}}
        if template == "plain":
            self.params["stop"] = CHAT_STOP
        self.session = ""
        self.after_reply = False  # the state ends on a reply (or unknown text): the next turn needs "\n\n"
        self.status = 0  # the exit code: 1 after a server error, 2 after a bad command
        self.handlers: dict[str, Callable[[str], None]] = {
            "/save": self.save,
            "/load": self.load,
            "/fork": self.fork,
            "/export": self.export,
            "/import": self.import_,
            "/reset": self.reset,
            "/stats": self.stats,
            "/help": self.help,
        }

    def emit(self, event: str, message: str, **fields: Any) -> None:
        """A command's result: a JSON line with --json, else a message on stderr."""
        if self.out.as_json:
            self.out.document({"event": event, "session": self.session, **fields})
        else:
            self.out.info(message)

    def switch(self, s: Session) -> None:
        self.session = s.id
        self.after_reply = s.tokens > 0
        if self.template == "server":
            self.params["session_id"] = s.id

    def open(self, session_id: str | None) -> None:
        """Continue `session_id` (created empty if it does not exist) or a new session; read --system."""
        created = False
        if session_id is None:
            s, created = self.client.create_session(), True
        else:
            try:
                s = self.client.get_session(session_id)
            except NotFound:
                s, created = self.client.create_session(session_id), True
        self.switch(s)
        said = f"new session {s.id}" if created else f"continuing session {s.id} ({s.tokens:,} tokens)"
        self.emit("session", said, tokens=s.tokens, created=created)
        self.read_system()

    def read_system(self) -> None:
        if self.system and self.template == "server":
            self.system_pending = True  # the model's template places it, with the first user line
        elif self.system:
            s = self.client.prime(self.session, system_turn(self.system, self.after_reply))
            self.after_reply = False
            self.emit("system", f"read the system text ({s.tokens:,} tokens in the session)", tokens=s.tokens)

    def start(self, text: str) -> Stream:
        """Send one user line; the open stream of the reply (waiting while the session is busy)."""
        if self.template == "server":
            system = (
                [{"role": "system", "content": self.system}] if self.system and self.system_pending else []
            )
            messages = [*system, {"role": "user", "content": text.strip()}]
            stream = when_free(lambda: self.client.chat(messages, stream=True, **self.params))
            self.system_pending = False
            return stream
        prompt = user_turn(text, self.after_reply)
        return when_free(lambda: self.client.generate(self.session, prompt, stream=True, **self.params))

    def turn(self, text: str) -> None:
        """One user line: stream the reply (stdout) as it arrives."""
        reply, finish, usage, shown = "", None, None, False
        stream = self.start(text)
        self.after_reply = True  # the prompt and the streamed tokens are in the state, even if cut short
        try:
            for chunk in stream:
                reply += chunk.text
                finish = chunk.finish_reason or finish
                usage = chunk.usage or usage
                if not self.out.as_json and reply.strip():
                    self.out.text(chunk.text if shown else reply.lstrip())
                    shown = True
        except KeyboardInterrupt:
            stream.close()
            finish = "interrupted"
        if self.out.as_json:
            used = dataclasses.asdict(usage) if usage else None
            doc = {"event": "turn", "session": self.session, "text": reply, "finish_reason": finish}
            self.out.document({**doc, "usage": used})
        else:
            self.out.text("\n")

    # -- commands --------------------------------------------------------------------------------

    def save(self, name: str) -> None:
        s = self.client.fork(self.session, need(name, "/save NAME"))
        self.emit("save", f"saved as {s.id} ({s.tokens:,} tokens)", saved_as=s.id, tokens=s.tokens)

    def load(self, name: str) -> None:
        s = self.client.get_session(need(name, "/load NAME"))
        self.switch(s)
        self.emit("load", f"now in session {s.id} ({s.tokens:,} tokens)", tokens=s.tokens)

    def fork(self, arg: str) -> None:
        if arg:
            raise UsageProblem("/fork takes no argument (/save NAME names the copy)")
        old = self.session
        self.switch(self.client.fork(old))
        self.emit("fork", f"now in the copy {self.session} ({old} stays as it was)", forked_from=old)

    def export(self, file: str) -> None:
        path = Path(need(file, "/export FILE"))
        data = self.client.export_state(self.session)
        write_blob(path, data)
        self.emit("export", f"exported to {path} ({size(len(data))})", file=str(path), bytes=len(data))

    def import_(self, file: str) -> None:
        data = read_blob(Path(need(file, "/import FILE")))
        s = self.client.import_state(self.session, data)
        self.switch(s)
        self.emit("import", f"imported {file} ({s.tokens:,} tokens)", file=file, tokens=s.tokens)

    def reset(self, arg: str) -> None:
        self.client.delete_session(self.session)
        self.switch(self.client.create_session(self.session))
        self.emit("reset", f"session {self.session} is empty again", tokens=0)
        self.read_system()

    def stats(self, arg: str) -> None:
        s = self.client.get_session(self.session)
        lines = [
            f"session {s.id}: {s.tokens:,} tokens read, {size(s.size_bytes)} stored (version {s.version})"
        ]
        if self.out.as_json:
            st = self.client.session_stats(self.session)
            self.out.document({"event": "stats", "session": self.session, **s.raw, "stats": st.raw})
            return
        self.out.info("\n".join(lines + stats_lines(self.client, self.session)))

    def help(self, arg: str) -> None:
        self.out.info("\n".join(f"{k:<14} {v}" for k, v in COMMANDS.items()))

    def command(self, line: str) -> bool:
        """Run a slash command; False for /quit."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name not in self.handlers:
            raise UsageProblem(f"unknown command {name!r}; /help lists them")
        self.handlers[name](arg.strip())
        return True

    def step(self, line: str) -> bool:
        """One input line (a turn or a command); a failure is reported and the chat goes on."""
        try:
            if line.startswith("/") and not line.startswith("//"):
                return self.command(line)
            if line.strip():
                self.turn(line[1:] if line.startswith("//") else line)
        except (RetserveError, UsageProblem) as e:
            self.status = max(self.status, 1 if isinstance(e, RetserveError) else 2)
            self.out.error(str(e))
            if self.out.as_json:
                self.out.document({"event": "error", "session": self.session, **error_json(e)})
        return True


def when_free(call: Callable[[], T], wait_s: float = 10.0) -> T:
    """`call()`, again while the session is busy (409 session_busy: e.g. the server is still saving
    an interrupted reply); a busy session never started the request, so sending it again is safe."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return call()
        except SessionBusy as e:
            if e.code != "session_busy" or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def need(arg: str, usage: str) -> str:
    if not arg:
        raise UsageProblem(f"usage: {usage}")
    return arg


def input_lines(out: Output) -> Iterator[str]:
    """Lines of standard input (with a prompt on a terminal) until end of input."""
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            try:
                yield out.err.input("[bold green]you>[/] ")
            except EOFError:
                return
            continue
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\r\n")


@app.command()
def chat(
    ctx: typer.Context,
    session: Annotated[
        str | None,
        typer.Option("--session", "-s", help="Continue (or create) this session (default: a new one)."),
    ] = None,
    system: Annotated[
        str | None, typer.Option("--system", help="A system text read before the first turn.")
    ] = None,
    max_tokens: MaxTokens = 256,
    temperature: Temperature = 0.7,
    seed: Seed = None,
    template: Annotated[
        Literal["plain", "server"],
        typer.Option(
            "--template",
            help="plain: the plain User:/Assistant: format, written here; server: the model's own chat"
            " template, applied by the server (for models that have one).",
        ),
    ] = "plain",
    as_json: JsonOpt = False,
) -> None:
    """Chat with the model; the conversation lives in a server session (one turn per input line)."""
    out = Output(as_json)
    with connection(ctx).client() as client:
        talk = Chat(client, out, system, sampling(max_tokens, temperature, seed), template)
        talk.open(session)
        if sys.stdin.isatty():
            out.info("type a message, /help for commands, /quit to leave")
        for line in input_lines(out):
            if not talk.step(line):
                break
    if talk.status:
        raise typer.Exit(talk.status)
