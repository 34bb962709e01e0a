"""Save and load reconstructors: registry name + config + conv shapes + provenance, and tensors.

Only the registry rebuilds code; the file holds data. A pruned model records the shape of every
convolution and is rebuilt by adapting the dense architecture (:func:`models.adapt_widths`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import SpadeError
from .io import load_checkpoint, read_manifest, save_checkpoint
from .models import Reconstructor, adapt_widths, build_model, check_size, layer_shapes, load_state


# Tensors under this prefix belong to a resumable training state (optimiser), not to the model.
TRAIN_STATE_PREFIX = "__optim__."


def model_manifest(model: Reconstructor, **extra: Any) -> dict:
    return {
        "model": model.registry_name,
        "config": dataclasses.asdict(model.config),
        "shapes": layer_shapes(model),
        "provenance": {"tool": f"spade-deploy {__version__}", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        **extra,
    }


def save_model(path: str | os.PathLike, model: Reconstructor, **extra: Any) -> Path:
    """Atomically write ``model`` with a manifest; ``extra`` keys (JSON-able) join the manifest."""
    return save_checkpoint(path, model.state_dict(), model_manifest(model, **extra))


def model_from_manifest(manifest: dict) -> Reconstructor:
    """Rebuild a checkpoint's architecture. Everything the manifest says is validated before
    anything is allocated: the config's fields (types, ranges, solver limits), the layer widths,
    and the parameter count they imply, measured on the meta device."""
    if not isinstance(manifest, dict):
        raise SpadeError("checkpoint manifest is not a JSON object")
    name = manifest.get("model")
    if not isinstance(name, str):
        raise SpadeError("checkpoint manifest names no model")
    config = manifest.get("config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise SpadeError(f"checkpoint config must be a JSON object, got {type(config).__name__}")
    shapes = manifest.get("shapes")
    if shapes is None:
        shapes = {}
    if not isinstance(shapes, dict):
        raise SpadeError(f"checkpoint layer shapes must be a JSON object, got {type(shapes).__name__}")
    if shapes:
        with torch.device("meta"):
            check_size(adapt_widths(build_model(name, config=config), shapes), f"checkpoint of a {name!r}")
    model = build_model(name, config=config)
    if shapes:
        adapt_widths(model, shapes)
    return model


def check_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or infinity (they would only give NaN images and scores)."""
    for key, value in state.items():
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value).all()):
                raise SpadeError(f"{where}: tensor {key!r} holds NaN or infinite values; refusing the checkpoint")


def load_model(path: str | os.PathLike, expect: str | None = None) -> tuple[Reconstructor, dict]:
    """Rebuild the architecture from the manifest and load the tensors (strict, finite)."""
    state, manifest = load_checkpoint(path)
    if expect is not None and manifest.get("model") != expect:
        raise SpadeError(f"{path} holds a {manifest.get('model')!r} model, expected {expect!r}")
    model = model_from_manifest(manifest)
    state = {k: v for k, v in state.items() if not k.startswith(TRAIN_STATE_PREFIX)}
    check_finite(state, str(path))
    load_state(model, state, where=str(path))
    return model, manifest


def is_pruned(manifest: dict) -> bool:
    return bool(manifest.get("pruning"))


__all__ = ["save_model", "load_model", "read_manifest", "model_from_manifest", "check_finite", "is_pruned"]
