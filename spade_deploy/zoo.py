"""Base models this project trained on the embedded dataset, shipped inside the package.

``spade demo`` starts SPADE from a trained reconstructor, as a user would. The base models in
``spade_deploy/weights/`` were made by ``spade demo --retrain`` (the recipes in
:data:`spade_deploy.train.DEMO_RECIPES`) and record the dataset they were trained on; one is used
only when the embedded dataset at hand is that same dataset (generator version, seed, sizes).
"""

from __future__ import annotations

import json
from pathlib import Path

from .io import read_manifest

WEIGHTS_DIR = Path(__file__).parent / "weights"
_KEY_FIELDS = ("format", "generator_version", "seed", "config")


def dataset_key(root: str | Path) -> dict | None:
    """What identifies an embedded dataset (None for other data)."""
    try:
        manifest = json.loads((Path(root) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != "spade-deploy/default-dataset":
        return None
    return {k: manifest.get(k) for k in _KEY_FIELDS}


def bundled_path(model: str, preset: str) -> Path:
    return WEIGHTS_DIR / f"{model}-{preset}.safetensors"


def bundled_base(model: str, preset: str, root: str | Path) -> Path | None:
    """The shipped base model for ``model``/``preset`` if it was trained on the dataset at ``root``."""
    path = bundled_path(model, preset)
    key = dataset_key(root)
    if key is None or not path.is_file():
        return None
    manifest = read_manifest(path)
    return path if manifest.get("dataset") == key and manifest.get("preset") == preset else None
