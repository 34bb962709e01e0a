"""Atomic writes and the safe checkpoint format.

A checkpoint is one ``.safetensors`` file: plain tensors plus a JSON manifest stored in the
safetensors metadata under ``spade_manifest``. Loading never unpickles anything, so a file that
holds a pickled object is refused before any of its bytes are interpreted as code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from .errors import SpadeError

if TYPE_CHECKING:  # torch is imported where tensors are saved: atomic writes alone need none of it
    import torch

FORMAT = "spade-deploy/1"
_MANIFEST_KEY = "spade_manifest"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary file is ``.<name>.<random>.tmp`` (:func:`remove_stale_temps` recognises it). On
    any exception it is removed and ``path`` is left as it was; a write that fails for want of
    room or permission (a full disk, a file-size limit, a read-only folder: any ``OSError`` inside
    the block or from the rename) becomes a one-line :class:`SpadeError` naming ``path``.
    """
    path = Path(path)
    if path.is_dir():
        raise SpadeError(f"output path {path} is a directory, expected a file")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise SpadeError(f"cannot write {path}: {parent} is a file, not a folder")
    tmp_path = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as exc:
        raise SpadeError(f"cannot write {path}: {_reason(exc)}") from None
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def _reason(exc: OSError) -> str:
    """An OSError's cause in a few words (``File too large``, ``No space left on device``); h5py
    and other libraries put the system's words inside their own message."""
    if exc.strerror:
        return exc.strerror
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for known in (errno.EFBIG, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
        if os.strerror(known) in text:
            return os.strerror(known)
    return text


def is_temp_of(name: str, target: str) -> bool:
    """Whether file ``name`` is a temporary file :func:`atomic_path` made for ``target`` (a name in
    the same folder): ``.<target>.<random>.tmp``, or one made for such a temporary (nested)."""
    match = _TEMP.fullmatch(name)
    return match is not None and (match["inner"] == target or is_temp_of(match["inner"], target))


_TEMP = re.compile(r"\.(?P<inner>.+)\.[A-Za-z0-9_]+\.tmp")  # tempfile.mkstemp's random part: letters, digits, _


def remove_stale_temps(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files a killed writer left in ``folder`` for the files ``names``: every
    temporary :func:`atomic_path` and :func:`save_checkpoint` create (the only files they create
    besides their target). Returns what it removed."""
    folder = Path(folder)
    names = list(names)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if entry.is_file() and not entry.is_symlink() and any(is_temp_of(entry.name, n) for n in names):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return sorted(removed)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Write tensors + manifest atomically as one safetensors file.

    The file is serialised in memory and written through :func:`atomic_path`'s temporary file:
    safetensors' own ``save_file`` writes a ``.tmpXXXXXX`` of its own beside the target, which a
    kill during the write would leave behind under a name nothing recognises."""
    from safetensors.torch import save

    manifest = {"format": FORMAT, **manifest}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    data = save(tensors, metadata={_MANIFEST_KEY: json.dumps(manifest)})
    del tensors
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return Path(path)


def read_manifest(path: str | os.PathLike) -> dict:
    """Read only the manifest (cheap: no tensor is loaded)."""
    return _open(path, load_tensors=False)[1]


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, manifest)``; raise :class:`SpadeError` for anything but our format."""
    return _open(path, load_tensors=True)


def _open(path: str | os.PathLike, load_tensors: bool) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.exists():
        raise SpadeError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise SpadeError(f"checkpoint path {path} is a folder, expected a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()} if load_tensors else {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise SpadeError(
            f"{path} is not a spade-deploy checkpoint (safetensors expected; pickled files are "
            f"refused and never loaded): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None
    raw = meta.get(_MANIFEST_KEY)
    if raw is None:
        raise SpadeError(f"{path} has no spade-deploy manifest; not a checkpoint written by this tool")
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError:
        raise SpadeError(f"{path}: its manifest is not valid JSON") from None
    if not isinstance(manifest, dict):
        raise SpadeError(f"{path}: its manifest is not a JSON object")
    if manifest.get("format") != FORMAT:
        raise SpadeError(f"{path}: unsupported checkpoint format {manifest.get('format')!r}")
    _check_sections(manifest, path)
    return state, manifest


# Manifest sections other modules read with ``.get``: each absent, null or a JSON object.
_SECTIONS = ("config", "shapes", "provenance", "pruning", "finetune", "train_state", "train_config", "imported")


def _check_sections(manifest: dict, path: Path) -> None:
    for key in _SECTIONS:
        if manifest.get(key) is not None and not isinstance(manifest[key], dict):
            raise SpadeError(f"{path}: manifest section {key!r} must be a JSON object, got {type(manifest[key]).__name__}")
    pruning = manifest.get("pruning") or {}
    ratio = pruning.get("ratio", 0.0)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise SpadeError(f"{path}: pruning ratio {ratio!r} is not a number in [0, 1)")
    for section, key in (("pruning", "parent"), ("finetune", "strategy")):
        value = (manifest.get(section) or {}).get(key)
        if value is not None and not isinstance(value, str):
            raise SpadeError(f"{path}: {section}.{key} must be a string, got {type(value).__name__}")
