"""Command-line options the library declares: a task's (MRI's sampling and coil maps, SR's
degradation), which the ``spade`` command adds to the commands that take them and hands back by
name (:meth:`spade_deploy.tasks.Task.from_cli`); and the one-line checks of option values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import SpadeError


@dataclass(frozen=True)
class CliOption:
    """One option: its Python ``name`` (the flag ``--name-with-dashes`` unless ``flags`` names
    them), its type as Typer reads it, default and help, and the ``spade`` commands that take it."""

    name: str
    type: Any
    default: Any
    help: str
    commands: tuple[str, ...]
    flags: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return self.flags[0] if self.flags else "--" + self.name.replace("_", "-")


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
