"""Shared CLI plumbing: one console, and the wrapper that turns user errors into one line."""

from __future__ import annotations

import functools
import math
import re
import sys

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from spade_deploy.errors import SpadeError
from spade_deploy.solvers import MAX_ITER, MIN_TOL

console = Console()
err_console = Console(stderr=True)


def print_table(table: Table, out: Console | None = None) -> None:
    """Print ``table`` with every cell whole, never cut to "x0…" by a narrow console.

    A table that fits is printed as is. Output that is not a terminal (a pipe, a file, a test
    runner) gets a console as wide as the table. On a terminal narrower than the table the columns
    are folded into several tables that each fit, the first column repeated in each so every row
    stays identified."""
    out = out or console
    width = _natural_width(out, table)
    if width <= out.width:
        out.print(table)
        return
    if not out.is_terminal:
        Console(file=out.file, width=width, no_color=out.no_color, highlight=False).print(table)
        return
    for i, part in enumerate(_fold_columns(table, out)):
        if i:
            out.print()
        out.print(part)


def _natural_width(out: Console, table: Table) -> int:
    """The table's width with no console limit (``Console.measure`` caps it at the console's width)."""
    return Measurement.get(out, out.options.update_width(100_000), table).maximum


def _fold_columns(table: Table, out: Console) -> list[Table]:
    columns = table.columns
    cells = [list(c.cells) for c in columns]

    def build(indices: list[int], title) -> Table:
        t = Table(title=title, box=table.box, show_lines=table.show_lines)
        for i in indices:
            c = columns[i]
            t.add_column(c.header, justify=c.justify, no_wrap=True, style=c.style)
        for r in range(table.row_count):
            t.add_row(*(cells[i][r] for i in indices))
        return t

    parts, current = [], [0]
    for i in range(1, len(columns)):
        if len(current) > 1 and _natural_width(out, build(current + [i], None)) > out.width:
            parts.append(current)
            current = [0]
        current.append(i)
    parts.append(current)
    return [build(p, table.title if k == 0 else None) for k, p in enumerate(parts)]


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


# ------------------------------------------------------------------------------------------------
# Option validation: every numeric option is checked before anything is read, built or written.
def check_number(name: str, value, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False):
    """``value`` (an option, or None when not given) lies in the range; else a one-line error."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not ok:
        raise SpadeError(f"{name} must be a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}"
                         f"{')' if hi_open else ']'}, got {value!r}")
    return value


def check_choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise SpadeError(f"{name} {value!r} is not one of: {', '.join(choices)}")
    return value


def check_device(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N``; CUDA only where a GPU is visible."""
    if not re.fullmatch(r"cpu|cuda(:\d{1,2})?", device):
        raise SpadeError(f"--device {device!r} is not a device: cpu | cuda | cuda:N")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SpadeError(f"--device {device}: no CUDA GPU is visible here")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise SpadeError(f"--device {device}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return device


def check_sampling(acceleration: int, center_fraction) -> None:
    check_number("--acceleration", acceleration, 1, 64)
    check_number("--center-fraction", center_fraction, 0.0, 1.0, lo_open=True)


def check_solver(max_iter, tol) -> None:
    check_number("--max-iter", max_iter, 1, MAX_ITER)
    check_number("--tol", tol, MIN_TOL, 1.0, hi_open=True)
