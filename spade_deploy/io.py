"""Atomic writes and the safe checkpoint format.

A checkpoint is one ``.safetensors`` file: plain tensors plus a JSON manifest stored in the
safetensors metadata under ``spade_manifest``. Loading never unpickles anything, so a file that
holds a pickled object is refused before any of its bytes are interpreted as code.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

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

    On any exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise SpadeError(f"output path {path} is a directory, expected a file")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise SpadeError(f"cannot write {path}: {parent} is a file, not a folder")
    parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], manifest: dict) -> Path:
    """Write tensors + manifest atomically as one safetensors file."""
    from safetensors.torch import save_file

    manifest = {"format": FORMAT, **manifest}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_MANIFEST_KEY: json.dumps(manifest)})
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
