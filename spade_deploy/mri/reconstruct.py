"""Reconstruct fastMRI-format files and write fastMRI-format outputs (dataset ``reconstruction``),
so fastMRI's own ``evaluate.py`` can score them against the targets (``spade reconstruct``:
:func:`reconstruct_checkpoint`; a model in hand: :func:`reconstruct_files`).

Each output holds, per slice, the magnitude image cropped to the header's recon size (e.g.
320 x 320 of a 640 x 320 readout-oversampled k-space; ``full_fov`` keeps the whole field of
view) and, for fixed-point models, ``iterations``, ``converged`` and ``final_residual``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from . import reader
from .acquisition import eval_seeds, make_batch
from ..archive import RECORD_KEY, Shard, after_output, output_record, shard_indices, up_to_date
from ..checkpoint import load_model
from ..deploy.cache import deployed_checkpoint
from ..device import on_model_device
from ..errors import SpadeError
from ..io import atomic_path
from .metrics import recon_magnitude
from ..models import Reconstructor
from ..paths import check_out_dir, check_outputs, sha256_file
from .physics import center_fraction_for
from ..progress import Reporter
from .volumes import FORMATS, output_path, write_volume


@dataclass
class ReconstructResult:
    outputs: list[Path]  # this run's outputs (written or, with skip_existing, found up to date)
    n_slices: int  # slices reconstructed by this run
    mean_iterations: float | None
    not_converged: list[str] = field(default_factory=list)  # "file.h5:slice" on the iteration cap
    skipped: list[Path] = field(default_factory=list)  # outputs found up to date, not redone
    shard: Shard = Shard()
    n_files: int = 0  # the inputs of every shard


def read_record(path: Path) -> dict | None:
    """The record (:func:`~spade_deploy.archive.output_record`) a fastMRI-format output keeps in
    its attributes, None if it has none."""
    with h5py.File(path, "r") as f:
        raw = f.attrs.get(RECORD_KEY)
        if raw is None or "reconstruction" not in f:
            return None
        return json.loads(raw)


@torch.no_grad()
def reconstruct_files(
    model: Reconstructor,
    source: str | Path | reader.SliceDataset,
    out_dir: str | Path,
    acceleration: int,
    center_fraction: float,
    batch_size: int = 4,
    on_slice: Callable[[int, int], None] | None = None,
    full_fov: bool = False,
    coil_maps: reader.CoilMapSource = "espirit",
    cache_dir: str | os.PathLike | None = None,
    output_format: str = "h5",
    checkpoint_sha256: str | None = None,
    shard: Shard = Shard(),
    skip_existing: bool = False,
) -> ReconstructResult:
    """Reconstruct every slice of every file under ``source`` (a path, or its dataset already
    opened: then ``coil_maps`` and ``cache_dir`` are the dataset's). ``output_format``: ``h5``
    (fastMRI layout), ``mrd`` (MRD images) or ``dicom`` (:func:`spade_deploy.mri.volumes.write_volume`).

    Fully sampled files are undersampled retrospectively with fastMRI's per-file mask seed (the
    same measurements `spade eval` scores); files that carry a ``mask`` are used as acquired.
    Coil maps come from each measurement's ACS block (see :func:`~spade_deploy.mri.acquisition.acquire`).

    ``shard``: only this shard's files (:func:`~spade_deploy.archive.shard_indices`, balanced by
    slices). Every h5 output records the checkpoint (``checkpoint_sha256``) and the settings that
    made it (attribute ``spade_record``); ``skip_existing`` (h5 only) skips an output recording
    exactly what this run would, and redoes any other.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpadeError(f"output path {out} is a file, expected a folder")
    if skip_existing and output_format != "h5":
        raise SpadeError("--skip-existing needs --format h5 (the record of what made an output is kept in the "
                         "fastMRI-format file's attributes)")
    if isinstance(source, reader.SliceDataset):
        ds, coil_maps, cache_dir = source, source.coil_maps, source.estimator.cache_dir
    else:
        ds = reader.SliceDataset(source, coil_maps=coil_maps, cache_dir=cache_dir)
    files = [reader.SliceDataset(path, coil_maps=coil_maps, cache_dir=cache_dir) for path in ds.files]
    mine = shard_indices([len(f) for f in files], shard)
    settings = {"model": getattr(model, "registry_name", ""), "acceleration": acceleration,
                "center_fraction": center_fraction, "coil_maps": coil_maps,
                "espirit": dataclasses.asdict(ds.estimator.params) if coil_maps == "espirit" else None,
                "field_of_view": "full" if full_fov else "recon", "format": output_format,
                "precision": model.precision}  # what ran: fp32, or a low-precision schedule with its FP32 finish
    model.eval()
    result = ReconstructResult(outputs=[], n_slices=0, mean_iterations=None, shard=shard, n_files=len(files))
    iters, done, total = [], 0, sum(len(files[i]) for i in mine)
    for i in mine:
        file_ds, path = files[i], files[i].files[0]
        target = out / path.name
        record = output_record(checkpoint_sha256, settings, path)
        if skip_existing and up_to_date(target, record, read_record):
            result.skipped.append(target)
            result.outputs.append(target)
            done += len(file_ds)
            if on_slice:
                on_slice(done, total)
            continue
        images, per_slice = [], {"iterations": [], "converged": [], "final_residual": []}
        mask = None
        for start in range(0, len(file_ds), batch_size):
            items = reader.collate([file_ds[j] for j in range(start, min(start + batch_size, len(file_ds)))])
            mask = items["mask"][0]
            batch = make_batch(items, acceleration, center_fraction, eval_seeds(items))
            x = model(*on_model_device((batch.y, batch.physics), model))
            info = model.solve_info()
            if info is not None:
                iters += info.iterations.tolist()
                per_slice["iterations"] += info.iterations.tolist()
                per_slice["converged"] += info.converged.tolist()
                per_slice["final_residual"] += info.residual.tolist()
                result.not_converged += [f"{path.name}:{s}" for s, c in
                                         zip(batch.meta["slices"], info.converged.tolist()) if not c]
            images.append(recon_magnitude(x, None if full_fov else batch.meta["recon_size"]).cpu().numpy())
            done += len(items["fname"])
            result.n_slices += len(items["fname"])
            if on_slice:
                on_slice(done, total)
        out.mkdir(parents=True, exist_ok=True)
        if output_format != "h5":
            engine = ",".join(sorted(set(getattr(model, "engine_choice", {}).values()))) or "torch"
            meta = {"SpadeModel": getattr(model, "registry_name", ""), "SpadeCheckpointSHA256": checkpoint_sha256,
                    "SpadeEngine": engine}
            result.outputs.append(write_volume(output_format, out, path, np.concatenate(images), per_slice, meta,
                                               full_fov))
            after_output(len(result.outputs) - len(result.skipped))
            continue
        with atomic_path(target) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("reconstruction", data=np.concatenate(images))
                if per_slice["iterations"]:
                    f.create_dataset("iterations", data=np.asarray(per_slice["iterations"], dtype=np.int32))
                    f.create_dataset("converged", data=np.asarray(per_slice["converged"], dtype=bool))
                    f.create_dataset("final_residual", data=np.asarray(per_slice["final_residual"], dtype=np.float32))
                m = mask.numpy() if mask is not None else None
                f.attrs["acceleration"] = acceleration if m is None else float(len(m) / max(m.sum(), 1))
                f.attrs["model"] = getattr(model, "registry_name", "")
                f.attrs["coil_maps"] = coil_maps
                if coil_maps == "espirit":
                    f.attrs["espirit"] = json.dumps(dataclasses.asdict(file_ds.estimator.params))
                f.attrs["field_of_view"] = "full" if full_fov else "recon"
                f.attrs["checkpoint_sha256"] = checkpoint_sha256 or ""
                f.attrs[RECORD_KEY] = json.dumps(record, sort_keys=True)
        result.outputs.append(target)
        after_output(len(result.outputs) - len(result.skipped))
    result.mean_iterations = float(np.mean(iters)) if iters else None
    return result


def reconstruct_checkpoint(
    checkpoint: Path,
    source: Path,
    out: Path,
    acceleration: int = 6,
    center_fraction: float | None = None,
    batch_size: int = 4,
    backend: str = "auto",
    engines: Path | None = None,
    full_fov: bool = False,
    coil_maps: reader.CoilMapSource = "espirit",
    cache_dir: str | os.PathLike | None = None,
    reporter: Reporter | None = None,
    output_format: str = "h5",
    shard: Shard = Shard(),
    skip_existing: bool = False,
) -> ReconstructResult:
    """``spade reconstruct`` of an MRI checkpoint: every file of ``source`` (a file or a folder;
    fastMRI or ISMRMRD raw HDF5) reconstructed by :func:`reconstruct_files` into ``out`` on
    ``backend`` (:func:`~spade_deploy.deploy.cache.deployed_checkpoint`), as ``output_format`` (h5 |
    mrd | dicom), ``shard`` and ``skip_existing`` as there. ``source`` is opened once; every output
    is checked against the inputs and the data folder before the model is loaded or anything is
    written."""
    if output_format not in FORMATS:
        raise SpadeError(f"unknown output format {output_format!r}; choose one of: {', '.join(FORMATS)}")
    if skip_existing and output_format != "h5":
        raise SpadeError("--skip-existing needs --format h5 (the record of what made an output is kept in the "
                         "fastMRI-format file's attributes)")
    reporter = reporter or Reporter()
    source, out = Path(source), Path(out)
    check_out_dir(out)
    ds = reader.SliceDataset(source, coil_maps=coil_maps, cache_dir=cache_dir)
    folder = source if source.is_dir() else source.parent
    check_outputs(files=[output_path(output_format, out, p) for p in ds.files], folders=[out],
                  inputs=[checkpoint, source, *ds.files], data=[folder])
    net, _ = load_model(checkpoint)
    cf = center_fraction if center_fraction is not None else center_fraction_for(acceleration)
    shape = tuple(ds[0]["kspace"].shape[-2:]) if backend != "torch" else None  # the engine is chosen for this size
    net = deployed_checkpoint(checkpoint, net, backend, engines, [folder], reporter, shape=shape)
    with reporter.progress("reconstructing", transient=True) as update:
        return reconstruct_files(net, ds, out, acceleration, cf, batch_size, on_slice=update, full_fov=full_fov,
                                 output_format=output_format, checkpoint_sha256=sha256_file(checkpoint),
                                 shard=shard, skip_existing=skip_existing)
