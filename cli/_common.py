"""Shared CLI plumbing: one console, and the wrapper that turns user errors into one line."""

from __future__ import annotations

import functools
import sys

import typer
from rich.console import Console

from spade_deploy.errors import SpadeError

console = Console()
err_console = Console(stderr=True)


def user_errors(fn):
    """Run a command; a :class:`SpadeError` (or bad file) prints ``error: ...`` and exits 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SpadeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            err_console.print(f"[bold red]error:[/] {exc.strerror or exc}: {exc.filename}", highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            sys.exit(130)
        raise typer.Exit(1)

    return wrapper
