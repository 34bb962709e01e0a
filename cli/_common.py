"""Shared CLI plumbing: one console, and the wrapper that turns user errors into one line."""

from __future__ import annotations

import functools
import inspect
import re
import sys
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from spade_deploy.errors import SpadeError
from spade_deploy.options import CliOption, check_number
from spade_deploy.solvers import MAX_ITER, MIN_TOL
from spade_deploy.tasks import task_class, task_names

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
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            err_console.print(f"[bold red]error:[/] {escape(f'{exc.strerror or exc}: {exc.filename}')}", highlight=False,
                              soft_wrap=True)
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]")
            sys.exit(130)
        raise typer.Exit(1)

    return wrapper


# ------------------------------------------------------------------------------------------------
# Option validation: every numeric option is checked before anything is read, built or written.
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


# ------------------------------------------------------------------------------------------------
# Options the tasks declare (Task.cli_options): the command asks the tasks, names none.
def task_cli_options(command: str) -> list[tuple[str, CliOption]]:
    """``(task name, option)`` of every option a registered task declares for ``command``."""
    found = [(name, opt) for name in task_names() for opt in task_class(name).cli_options if command in opt.commands]
    names = [opt.name for _, opt in found]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise RuntimeError(f"{command}: tasks declare the same option {', '.join(clash)}")
    return found


def with_task_options(command: str):
    """Add to the decorated command every task's options for ``command`` (after its own); the
    command gets their values as one dict, its keyword ``task_options`` (name -> value)."""
    declared = task_cli_options(command)

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)  # the command's own options as Typer reads them
        own = [p for p in sig.parameters.values() if p.name != "task_options"]
        extra = [inspect.Parameter(opt.name, inspect.Parameter.KEYWORD_ONLY, default=opt.default,
                                   annotation=Annotated[opt.type, typer.Option(*opt.flags, help=opt.help)] if opt.flags
                                   else Annotated[opt.type, typer.Option(help=opt.help)])
                 for _, opt in declared]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {opt.name: kwargs.pop(opt.name, opt.default) for _, opt in declared}
            return fn(*args, task_options=values, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)
        wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
        return wrapper

    return deco


def own_task_options(task_name: str, command: str, values: dict[str, Any]) -> dict[str, Any]:
    """The options of ``task_name`` among ``values``; an option of another task given a value
    other than its default is a one-line error (it would change nothing)."""
    own = {}
    for owner, opt in task_cli_options(command):
        if owner == task_name:
            own[opt.name] = values[opt.name]
        elif values[opt.name] != opt.default:
            raise SpadeError(f"{opt.flag} is an option of the {owner} task; this model's task is {task_name}")
    return own
