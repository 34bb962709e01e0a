"""Base models this project trained on the embedded data, shipped inside the package.

``spade demo`` starts SPADE from a trained reconstructor, as a user would. The base models in
``spade_deploy/weights/`` were made by ``spade demo --retrain`` (the recipes in
:data:`spade_deploy.train.DEMO_RECIPES`) and record the data they were trained on (the task's
:meth:`~spade_deploy.tasks.Task.dataset_key`: for MRI the simulated dataset's generator version,
seed and sizes; for super-resolution the photographs' bytes, the kernels, the tile and crop
sizes); one is used only when the embedded data at hand is that same data.
"""

from __future__ import annotations

from pathlib import Path

from .io import read_manifest

WEIGHTS_DIR = Path(__file__).parent / "weights"


def bundled_path(model: str, preset: str) -> Path:
    return WEIGHTS_DIR / f"{model}-{preset}.safetensors"


def bundled_base(model: str, preset: str, key: dict | None) -> Path | None:
    """The shipped base model for ``model``/``preset`` if it was trained on the data identified by
    ``key`` (:meth:`spade_deploy.tasks.Task.dataset_key`; None: a user's data, never)."""
    path = bundled_path(model, preset)
    if key is None or not path.is_file():
        return None
    manifest = read_manifest(path)
    return path if manifest.get("dataset") == key and manifest.get("preset") == preset else None
