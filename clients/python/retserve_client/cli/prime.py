"""`retserve prime FILE --session ID`: read a large document into a session, piece by piece.

Pieces are cut so that the session reads exactly the whole file's tokens (see `pieces`). Progress
(tokens/s, ETA) goes to stderr: a live bar on a terminal, one line per piece otherwise.

Resuming: a small record (under $XDG_STATE_HOME/retserve/prime/, keyed by server, session and the
file's SHA-256) is written before and after each piece with the session's `tokens` and `version`.
Run the same command again after an interruption: if the session is as recorded, reading continues
with the next piece; if the piece in flight was saved by the server (a read is all or nothing, and a
save bumps the version by one), with the one after it. A session changed in any other way is refused
(exit 2; `--restart` reads the whole file again). No piece is ever read twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from retserve_client.cli.app import JsonOpt, app, connection
from retserve_client.cli.output import Output, UsageProblem
from retserve_client.cli.pieces import split_pieces
from retserve_client.cli.progress import PrimeProgress
from retserve_client.errors import NotFound
from retserve_client.sync_client import Client
from retserve_client.types import Session


@dataclass(frozen=True)
class Record:
    """How far one file got into one session: `next` pieces read, leaving it at (`tokens`, `version`);
    `reading`: piece `next` was sent and its answer had not come back."""

    file_sha256: str
    session: str
    url: str
    piece_chars: int
    pieces: int
    next: int
    tokens: int
    version: int
    reading: bool = False

    @classmethod
    def load(cls, path: Path) -> Record | None:
        try:
            obj = json.loads(path.read_text())
            return cls(**{f.name: obj[f.name] for f in dataclasses.fields(cls)})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageProblem(f"unreadable progress record {path}: {e} (--restart ignores it)") from None

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self)))
        os.replace(tmp, path)  # atomic: an interrupt leaves the old record or the new one

    def at(self, s: Session, next_piece: int) -> Record:
        """Where the file stands once `next_piece` pieces are read, leaving the session as `s`."""
        return dataclasses.replace(self, next=next_piece, tokens=s.tokens, version=s.version, reading=False)


def record_path(url: str, session: str, digest: str) -> Path:
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    key = hashlib.sha256(f"{url}\n{session}\n{digest}".encode()).hexdigest()[:32]
    return base / "retserve" / "prime" / f"{key}.json"


def resume_point(rec: Record | None, s: Session) -> int:
    """The first piece still to read, given the record and the session as it is now."""
    if rec is None:
        return 0
    if (s.tokens, s.version) == (rec.tokens, rec.version):
        return rec.next
    if rec.reading and s.version == rec.version + 1 and s.tokens > rec.tokens:
        return rec.next + 1  # the piece in flight was read and saved; its answer was lost
    raise UsageProblem(
        f"session {s.id!r} changed since this file was last read into it (it has {s.tokens:,} tokens,"
        f" version {s.version}; the record says {rec.tokens:,}, version {rec.version}): pass --restart"
        " to read the whole file again"
    )


def read_text(file: Path) -> str:
    try:
        return file.read_bytes().decode("utf-8")
    except OSError as e:
        raise UsageProblem(f"cannot read {file}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageProblem(f"{file} is not UTF-8 text: {e}") from None


def open_session(client: Client, session_id: str) -> Session:
    try:
        return client.get_session(session_id)
    except NotFound:
        return client.create_session(session_id)


def read_pieces(
    client: Client, pieces: list[str], s: Session, rec: Record, path: Path, bar: PrimeProgress
) -> Session:
    """Read pieces[rec.next:] into the session `s` (as `rec` says it is), recording progress around
    each one; the session after the last."""
    for i in range(rec.next, len(pieces)):
        dataclasses.replace(rec, reading=True).save(path)
        s = client.prime(rec.session, pieces[i])
        rec = rec.at(s, i + 1)
        rec.save(path)
        bar.advance(len(pieces[i]), s.tokens)
    return s


@app.command()
def prime(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A UTF-8 text file.", dir_okay=False)],
    session: Annotated[
        str, typer.Option("--session", "-s", help="The session to read it into (created if new).")
    ],
    chunk_chars: Annotated[
        int, typer.Option("--chunk-chars", min=256, help="About how many characters each request sends.")
    ] = 16000,
    restart: Annotated[
        bool, typer.Option("--restart", help="Ignore earlier progress: read the whole file (again).")
    ] = False,
    progress_file: Annotated[
        Path | None, typer.Option("--progress-file", help="Where to keep the resume record.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Read FILE into a session in pieces, with a progress bar; rerun the same command to resume."""
    out = Output(as_json)
    text = read_text(file)
    digest = hashlib.sha256(text.encode()).hexdigest()
    with connection(ctx).client() as client:
        path = progress_file or record_path(client.config.base_url, session, digest)
        rec = None if restart else Record.load(path)
        if rec is not None and (rec.file_sha256, rec.session) != (digest, session):
            raise UsageProblem(f"{path} records another file or session; pass --restart or another file")
        s = open_session(client, session)
        start = resume_point(rec, s)
        pieces = split_pieces(text, rec.piece_chars if rec else chunk_chars)
        if rec is None:
            rec = Record(
                digest, session, client.config.base_url, chunk_chars, len(pieces), 0, s.tokens, s.version
            )
            if s.tokens:
                out.warn(f"session {session} already has {s.tokens:,} tokens: the file is read after them")
        elif start == len(pieces):
            out.info(f"{file} was already read into {session}: nothing to do (--restart reads it again)")
        elif start:
            out.info(f"resuming at piece {start + 1}/{len(pieces)} ({s.tokens:,} tokens read)")
        done_chars = sum(len(p) for p in pieces[:start])
        with PrimeProgress(out.err, len(text), done_chars, s.tokens) as bar:
            try:
                s = read_pieces(client, pieces, s, rec.at(s, start), path, bar)
            except KeyboardInterrupt:
                out.info("run the same command again to continue where it stopped")
                raise
    summary: dict[str, Any] = {
        "session": session,
        "file": str(file),
        "tokens": s.tokens,
        "chars": len(text),
        "pieces": len(pieces),
        "pieces_read": len(pieces) - start,
        "resumed_at": start,
        "tokens_per_s": round(bar.rate(), 1),
        "progress_file": str(path),
    }
    if as_json:
        out.document(summary)
    else:
        read_now = f"{len(pieces) - start} of {len(pieces)} pieces read now"
        out.text(f"primed {session}: {s.tokens:,} tokens ({read_now})\n")
