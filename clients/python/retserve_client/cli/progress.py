"""The progress of `retserve prime`: characters sent, tokens read, tokens/s and the time left.

On a terminal a live rich bar; otherwise (a pipe, a log file, CI) one plain line per piece."""

from __future__ import annotations

import time
from datetime import timedelta
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn


class PrimeProgress:
    """Counts characters (the total is known before reading) and tokens (known as the server reads)."""

    def __init__(self, console: Console, total_chars: int, done_chars: int, tokens: int) -> None:
        self.console = console
        self.total = total_chars
        self.done = done_chars
        self.tokens = tokens
        self.start_chars, self.start_tokens = done_chars, tokens
        self.t0 = time.monotonic()
        self.live: Progress | None = None
        self.task = None

    def __enter__(self) -> PrimeProgress:
        if self.console.is_terminal:
            self.live = Progress(
                TextColumn("[bold]prime"),
                BarColumn(),
                TaskProgressColumn(),
                TextColumn("{task.fields[tokens]} tokens  {task.fields[rate]} tok/s  ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self.live.start()
            self.task = self.live.add_task("prime", total=self.total, completed=self.done, **self.fields())
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live is not None:
            self.live.stop()

    def rate(self) -> float:
        """Tokens per second read in this run."""
        elapsed = time.monotonic() - self.t0
        return (self.tokens - self.start_tokens) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at this run's pace in characters (None before the first piece)."""
        sent, elapsed = self.done - self.start_chars, time.monotonic() - self.t0
        return (self.total - self.done) * elapsed / sent if sent > 0 else None

    def fields(self) -> dict[str, str]:
        return {"tokens": f"{self.tokens:,}", "rate": f"{self.rate():,.0f}"}

    def advance(self, chars: int, tokens: int) -> None:
        """A piece of `chars` characters was read; the session now has `tokens` tokens."""
        self.done += chars
        self.tokens = tokens
        if self.live is not None and self.task is not None:
            self.live.update(self.task, completed=self.done, **self.fields())
            return
        eta = self.eta()
        left = "?" if eta is None else str(timedelta(seconds=round(eta)))
        pct = 100.0 * self.done / self.total if self.total else 100.0
        self.console.print(
            f"prime: {self.done:,}/{self.total:,} chars ({pct:.0f}%), {self.tokens:,} tokens,"
            f" {self.rate():,.0f} tok/s, ETA {left}",
            highlight=False,
            markup=False,
        )
