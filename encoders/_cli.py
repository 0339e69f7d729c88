"""What every ``bindsearch`` command does with a user error: one line on stderr, exit 1."""

from __future__ import annotations

from typing import NoReturn

import typer


def fail(msg: object) -> NoReturn:
    """``error: <msg>`` on stderr and exit status 1: a user error is not a crash (no traceback)."""
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(1)
