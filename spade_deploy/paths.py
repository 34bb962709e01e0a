"""Output-path safety: no command overwrites its input or writes into the user's data folder.

Every command that writes calls :func:`check_outputs` with the files (or folders) it will write
and the paths it reads, before it builds or writes anything. Paths are compared after resolving
symbolic links (and, for files that exist, by inode, so a hard link to an input is caught too).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from .errors import SpadeError

PathLike = str | os.PathLike


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def _same(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(
    files: Iterable[PathLike] = (),
    folders: Iterable[PathLike] = (),
    inputs: Iterable[PathLike | None] = (),
    data: Iterable[PathLike | None] = (),
    option: str = "--out",
) -> None:
    """Refuse (one-line :class:`SpadeError`) any output that would destroy an input or land in data.

    ``files``: the files the command will write; ``folders``: the folders it will write into;
    ``inputs``: files and folders it reads (an output equal to one of them is refused);
    ``data``: the user's data folders (nothing may be written inside them); ``option``: the
    option that names the output, for the message.
    """
    ins = [(Path(p), _resolved(p)) for p in inputs if p is not None]
    datas = [(Path(d), _resolved(d)) for d in data if d is not None]
    for kind, paths in (("output", files), ("output folder", folders)):
        for out in paths:
            r = _resolved(out)
            for given, ri in ins:
                if _same(r, ri):
                    raise SpadeError(f"{kind} {out} is the input {given}; refusing to overwrite it (choose another {option})")
            for given, rd in datas:
                if _inside(r, rd):
                    raise SpadeError(f"{kind} {out} lies in the data folder {given}; nothing is written there "
                                     f"(choose another {option})")


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes (binds exports to the checkpoint they came from)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def memory_bytes() -> int:
    """Physical memory of this machine (a bound for what an input file may ask to allocate)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 << 30


__all__ = ["check_outputs", "sha256_file", "memory_bytes"]


def check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SpadeError(f"output path {out} is a file, expected a folder")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/spade-deploy``, else ``~/.cache/spade-deploy``: what is derived from a
    user's data or models and kept between runs (estimated coil maps, exported priors), never
    in the data folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "spade-deploy"
