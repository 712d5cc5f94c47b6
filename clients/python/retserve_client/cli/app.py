"""The `retserve` command: global options, the command tree, and exit codes.

Exit codes: 0 ok; 1 the server (or the connection to it) failed: any `RetserveError`; 2 a usage error
(bad arguments or option values, a missing or unreadable file, an inconsistent resume); 130 interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import typer

from retserve_client.cli.output import UsageProblem, report
from retserve_client.errors import RetserveError
from retserve_client.sync_client import Client

HELP = """Talk to a retserve server: chat with a session's memory, read long documents into sessions,
complete text, and manage sessions (list, show, fork, export, import, remove).

Exit codes: 0 ok, 1 server or connection error, 2 usage error, 130 interrupted."""

app = typer.Typer(
    name="retserve",
    help=HELP,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# click's exception classes, found through typer's public names: newer typer releases vendor their own click
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
INTERRUPTED = 130
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document to stdout (for scripts).")]


@dataclass(frozen=True)
class Connection:
    """Where and how to reach the server (the global options)."""

    url: str | None
    api_key: str | None
    timeout: float

    def client(self) -> Client:
        try:
            return Client(self.url, self.api_key, timeout=self.timeout)
        except ValueError as e:  # a malformed --url / RETSERVE_URL
            raise UsageProblem(str(e)) from None


@app.callback()
def options(
    ctx: typer.Context,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", envvar="RETSERVE_URL", help="Server base URL (default: http://127.0.0.1:8000)."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", envvar="RETSERVE_API_KEY", help="API key (Bearer token).")
    ] = None,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds to wait for each request.")
    ] = 300.0,
) -> None:
    ctx.obj = Connection(url, api_key, timeout)


def connection(ctx: typer.Context) -> Connection:
    """The global options, from the root context."""
    conn = ctx.find_object(Connection)
    assert conn is not None, "the app callback sets the connection"
    return conn


def _register() -> None:
    """Add the subcommands (their modules import `app` from here)."""
    from retserve_client.cli import chat, commands, prime, sessions  # noqa: F401


def run(argv: list[str] | None = None) -> int:
    """Run the command line; the exit code."""
    _register()
    command = typer.main.get_command(app)
    try:
        rv = command.main(args=argv, prog_name="retserve", standalone_mode=False)
    except typer.Exit as e:
        rv = e.exit_code
    except CLICK_ERROR as e:  # bad arguments or option values: click says which
        e.show()
        return 2 if isinstance(e, USAGE_ERROR) else e.exit_code
    except (typer.Abort, KeyboardInterrupt):  # click without typer's Ctrl-C rule
        rv = INTERRUPTED
    except UsageProblem as e:
        report(e)
        return 2
    except RetserveError as e:
        report(e)
        return 1
    code = rv if isinstance(rv, int) else 0
    if code == INTERRUPTED:  # typer turns Ctrl-C into this exit code, silently
        report(UsageProblem("interrupted"))
    return code
