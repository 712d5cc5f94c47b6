"""The `retserve` command line (installed with the client: `pip install ./clients/python`).

Split by responsibility: `app` (global options, exit codes), `chat`, `prime`, `sessions`, `commands`
(complete, health), `output` (stdout / stderr / JSON).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    """The `retserve` entry point."""
    from retserve_client.cli.app import run

    sys.exit(run(argv))
