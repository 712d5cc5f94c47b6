"""`retserve sessions ls|show|rm|export|import|fork`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from retserve_client.cli.app import JsonOpt, app, connection
from retserve_client.cli.output import Output, UsageProblem, session_lines, sessions_table, size
from retserve_client.sync_client import Client
from retserve_client.types import Session

sessions_app = typer.Typer(help="List, show, fork, export, import and remove sessions.", no_args_is_help=True)
app.add_typer(sessions_app, name="sessions")
SessionArg = Annotated[str, typer.Argument(help="Session id.")]


def stats_lines(client: Client, session_id: str) -> list[str]:
    """The state's memory: bytes in memory and the norm of every (layer, head) state matrix."""
    st = client.session_stats(session_id)
    lines = [f"state: {size(st.state_bytes)} in memory, {st.num_layers} layers x {st.num_heads} heads"]
    lines += [
        f"  layer {i} state norms: " + " ".join(f"{v:.3g}" for v in layer)
        for i, layer in enumerate(st.state_norms)
    ]
    return lines


def read_blob(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise UsageProblem(f"cannot read {file}: {e.strerror or e}") from None


def write_blob(file: Path, data: bytes) -> None:
    try:
        file.write_bytes(data)
    except OSError as e:
        raise UsageProblem(f"cannot write {file}: {e.strerror or e}") from None


def print_session(out: Output, s: Session, what: str) -> None:
    """One session: its JSON object, or `what` then its tokens and size."""
    if out.as_json:
        out.document(s.raw)
    else:
        out.text(f"{what} {s.id}: {s.tokens:,} tokens, {size(s.size_bytes)}\n")


@sessions_app.command("ls")
def list_sessions(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List your sessions (every page)."""
    out = Output(as_json)
    with connection(ctx).client() as client:
        found = list(client.list_sessions())
    if as_json:
        out.document({"object": "list", "data": [s.raw for s in found]})
    elif found:
        out.table(sessions_table(found))
    else:
        out.info("no sessions")


@sessions_app.command("show")
def show(
    ctx: typer.Context,
    session_id: SessionArg,
    stats: Annotated[bool, typer.Option("--stats", help="Also the state's memory (norms).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show one session (tokens read, size, version, provenance)."""
    out = Output(as_json)
    with connection(ctx).client() as client:
        s = client.get_session(session_id)
        if as_json:
            doc = dict(s.raw)
            if stats:
                doc["stats"] = client.session_stats(session_id).raw
            out.document(doc)
            return
        lines = session_lines(s) + (stats_lines(client, session_id) if stats else [])
    out.text("".join(line + "\n" for line in lines))


@sessions_app.command("rm")
def remove(
    ctx: typer.Context,
    session_ids: Annotated[list[str], typer.Argument(help="Session ids.")],
    as_json: JsonOpt = False,
) -> None:
    """Delete sessions (all named ones must exist: a missing one is an error, after the others)."""
    out = Output(as_json)
    with connection(ctx).client() as client:
        for sid in session_ids:
            client.delete_session(sid)
            if not as_json:
                out.text(f"deleted {sid}\n")
    if as_json:
        out.document({"deleted": session_ids})


@sessions_app.command("fork")
def fork(
    ctx: typer.Context,
    session_id: SessionArg,
    new_id: Annotated[str | None, typer.Argument(help="The copy's id (default: a random one).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Copy a session (state and next-token logits) under a new id."""
    with connection(ctx).client() as client:
        s = client.fork(session_id, new_id)
    print_session(Output(as_json), s, "forked")


@sessions_app.command("export")
def export(
    ctx: typer.Context,
    session_id: SessionArg,
    file: Annotated[Path, typer.Argument(help="Where to write the state blob.", dir_okay=False)],
    as_json: JsonOpt = False,
) -> None:
    """Write a session's state to FILE (import it here or on any server of the same model)."""
    out = Output(as_json)
    with connection(ctx).client() as client:
        data = client.export_state(session_id)
    write_blob(file, data)
    if as_json:
        out.document({"id": session_id, "file": str(file), "bytes": len(data)})
    else:
        out.text(f"exported {session_id} to {file} ({size(len(data))})\n")


@sessions_app.command("import")
def import_(
    ctx: typer.Context,
    session_id: SessionArg,
    file: Annotated[Path, typer.Argument(help="A state blob written by `sessions export`.")],
    as_json: JsonOpt = False,
) -> None:
    """Create (or replace) SESSION_ID from a state FILE."""
    data = read_blob(file)
    with connection(ctx).client() as client:
        s = client.import_state(session_id, data)
    print_session(Output(as_json), s, "imported")
