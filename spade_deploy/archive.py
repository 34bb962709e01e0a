"""Archive-scale runs of one command over many files: shards and records of what made an output.

``--shard R/N`` (default: torchrun's ``RANK`` / ``WORLD_SIZE`` where both are set) gives process
``R`` of ``N`` its share of the inputs, balanced by weight (slices of a k-space file, pixels of an
image): every process computes the same assignment from the same sorted inputs, so ``N``
processes started alike (on one machine or several, sharing the output folder) together cover
every input exactly once, and nothing needs to be exchanged between them.

Every output records what made it (:func:`output_record`): the checkpoint's SHA-256, the settings
that change the result, and the input's identity (name, size and modification time in
nanoseconds: the ``stat`` that ``make`` and ``rsync`` trust; hashing a fastMRI archive's inputs
would read terabytes on every run, and a copy that changes a file's time only costs its
redoing). ``--skip-existing`` skips an output only if its record equals the one this run would
write, and redoes it otherwise.
"""

from __future__ import annotations

import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from .errors import SpadeError

RECORD_KEY = "spade_record"  # where outputs keep their record (HDF5 attribute, PNG text chunk)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    count: int = 1

    def __str__(self) -> str:
        return f"{self.rank}/{self.count}"


def parse_shard(text: str | None, env: Mapping[str, str] | None = None) -> Shard:
    """``R/N`` (``0 <= R < N``); None: torchrun's ``RANK`` / ``WORLD_SIZE`` if both are set, else 0/1."""
    env = os.environ if env is None else env
    what = "--shard"
    if text is None:
        if env.get("RANK") is None or env.get("WORLD_SIZE") is None:
            return Shard()
        text, what = f"{env['RANK']}/{env['WORLD_SIZE']}", "RANK / WORLD_SIZE"
    match = re.fullmatch(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*", text)
    if match is None or not 0 <= int(match[1]) < int(match[2]):
        raise SpadeError(f"{what} {text!r} is not R/N with 0 <= R < N (e.g. 0/4: the first of 4 shards)")
    return Shard(int(match[1]), int(match[2]))


def assign(weights: Sequence[int], count: int) -> list[list[int]]:
    """The indices of ``weights`` each of ``count`` shards takes: heaviest first (ties: the earlier
    index) to the least loaded shard (ties: the lower rank), each shard's list in index order."""
    loads, parts = [0] * count, [[] for _ in range(count)]
    for i in sorted(range(len(weights)), key=lambda i: (-int(weights[i]), i)):
        r = min(range(count), key=lambda r: (loads[r], r))
        parts[r].append(i)
        loads[r] += int(weights[i])
    return [sorted(p) for p in parts]


def shard_indices(weights: Sequence[int], shard: Shard) -> list[int]:
    return assign(weights, shard.count)[shard.rank]


def input_identity(path: Path) -> dict:
    """What identifies an input without reading it (see the module's note)."""
    st = Path(path).stat()
    return {"name": Path(path).name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def output_record(checkpoint_sha256: str | None, settings: dict, source: Path) -> dict:
    """What an output records of what made it (compared whole by ``--skip-existing``)."""
    return {"checkpoint_sha256": checkpoint_sha256, "settings": settings, "input": input_identity(source)}


def up_to_date(target: Path, expected: dict, read_record: Callable[[Path], dict | None]) -> bool:
    """Whether ``target`` exists and records exactly ``expected`` (an unreadable one: no)."""
    if not target.exists():
        return False
    try:
        return read_record(target) == expected
    except Exception:  # noqa: BLE001 - a damaged or foreign output is redone, whatever its fault
        return False


# Test hook, off by default (shared with `spade train`'s): $SPADE_KILL_AT=output:N makes the
# process kill itself with SIGKILL right after writing its N-th output, so tests interrupt an
# archive run at the same place on any machine. Other values are not this hook's.
KILL_ENV = "SPADE_KILL_AT"


def after_output(written: int) -> None:
    if os.environ.get(KILL_ENV, "") == f"output:{written}":
        os.kill(os.getpid(), signal.SIGKILL)
