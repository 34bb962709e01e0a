"""Reconstruct fastMRI-format files and write fastMRI-format outputs (dataset ``reconstruction``),
so fastMRI's own ``evaluate.py`` can score them against the targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from . import data as D
from .device import on_model_device
from .errors import SpadeError
from .io import atomic_path
from .models import Reconstructor
from .physics import MultiCoilMRI


@dataclass
class ReconstructResult:
    outputs: list[Path]
    n_slices: int
    mean_iterations: float | None


def _acquired_mask(path: Path) -> np.ndarray | None:
    """fastMRI test/challenge files carry the acquisition mask, one 0/1 value per k-space column;
    their k-space is already undersampled. A mask that cannot belong to the file's k-space is
    refused (a wrong width, a 2-D array, values other than 0/1, no sampled column)."""
    with h5py.File(path, "r") as f:
        if "mask" not in f:
            return None
        width = f["kspace"].shape[-1]
        mask = np.asarray(f["mask"][()])
    if mask.ndim == 0 or mask.size != width or mask.shape[-1] != width:
        raise SpadeError(f"{path}: mask of shape {mask.shape} does not match kspace of width {width} (expected ({width},))")
    mask = mask.reshape(width).astype(np.float32)
    if not np.isin(mask, (0.0, 1.0)).all():  # NaN fails this too
        raise SpadeError(f"{path}: mask must hold only 0 and 1 (one value per k-space column)")
    if not mask.any():
        raise SpadeError(f"{path}: mask samples no k-space column")
    return mask


@torch.no_grad()
def reconstruct_files(
    model: Reconstructor,
    source: str | Path,
    out_dir: str | Path,
    acceleration: int,
    center_fraction: float,
    batch_size: int = 4,
    on_slice: Callable[[int, int], None] | None = None,
) -> ReconstructResult:
    """Reconstruct every slice of every file under ``source``.

    Fully sampled files are undersampled retrospectively with fastMRI's per-file mask seed (the
    same measurements `spade eval` scores); files that carry a ``mask`` are used as acquired.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpadeError(f"output path {out} is a file, expected a folder")
    ds = D.SliceDataset(source)
    model.eval()
    outputs, iters, done = [], [], 0
    for path in ds.files:
        file_ds = D.SliceDataset(path, coil_maps=ds.coil_maps)
        mask = _acquired_mask(path)
        slices = []
        for start in range(0, len(file_ds), batch_size):
            items = D.collate([file_ds[i] for i in range(start, min(start + batch_size, len(file_ds)))])
            if mask is None:
                seeds = [D.fastmri_seed(f) for f in items["fname"]]
                y, physics = D.undersample(items["kspace"], acceleration, center_fraction, seeds, smaps=items["smaps"])
            else:
                physics = MultiCoilMRI(torch.from_numpy(mask), items["smaps"])
                y = items["kspace"] * physics.mask
            x = model(*on_model_device((y, physics), model))
            info = getattr(model, "last_info", None)
            if info is not None:
                iters += info.iterations.tolist()
            slices.append(x.abs().float().cpu().numpy())
            done += len(items["fname"])
            if on_slice:
                on_slice(done, len(ds))
        target = out / path.name
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("reconstruction", data=np.concatenate(slices))
                f.attrs["acceleration"] = acceleration if mask is None else float(len(mask) / max(mask.sum(), 1))
                f.attrs["model"] = getattr(model, "registry_name", "")
        outputs.append(target)
    return ReconstructResult(outputs=outputs, n_slices=done, mean_iterations=float(np.mean(iters)) if iters else None)
