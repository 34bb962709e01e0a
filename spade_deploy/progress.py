"""How a long step of the pipeline tells its caller what it is doing.

The library never prints: a step takes a :class:`Reporter` and calls it. The base class reports
nothing (what Python callers and tests get); ``spade`` subclasses it to draw progress bars and print
lines and tables (``cli/main.py``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

# update(done, total=None, description=None, info=""): progress of the current step
Update = Callable[..., None]


def _ignore(*args, **kwargs) -> None:
    return None


class Reporter:
    """Callbacks of a running pipeline step; every one does nothing here."""

    def note(self, text: str) -> None:
        """A line worth telling the user (what was reused, where a result went)."""

    def stage(self, title: str) -> None:
        """A new stage of a longer run begins (the demo's train, prune, fine-tune, bench)."""

    @contextlib.contextmanager
    def progress(self, description: str, transient: bool = False) -> Iterator[Update]:
        """A step with measurable progress: the body calls the yielded
        ``update(done, total=None, description=None, info="")``; ``transient``: nothing of it need
        stay on screen afterwards."""
        yield _ignore


__all__ = ["Reporter", "Update"]
