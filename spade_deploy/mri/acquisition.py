"""Acquisition: the measurements of a batch of slices and their operator.

:func:`acquire` masks each slice with its file's acquisition mask or a fastMRI
equispaced-fraction mask (fastMRI's per-file seed ``tuple(map(ord, fname))`` for evaluation,
fresh random offsets for training), estimates coil maps from the ACS block (or takes the
file's), and :func:`make_batch` builds the task's :class:`~spade_deploy.tasks.Batch` with the
:class:`~spade_deploy.mri.physics.MultiCoilMRI` operator. :func:`undersample` applies the masks
to k-space with given coil maps.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .coilmaps import acs_run, centre_block
from ..errors import SpadeError
from .physics import MultiCoilMRI, equispaced_mask, ifft2c
from .reader import SliceBatch
from ..tasks import Batch

MaskSeed = int | tuple[int, ...] | None

def fastmri_seed(fname: str) -> tuple[int, ...]:
    """fastMRI's deterministic evaluation mask seed for a file name."""
    return tuple(map(ord, fname))


def undersample(
    kspace: torch.Tensor,
    acceleration: int,
    center_fraction: float,
    seeds: Sequence[MaskSeed] | None = None,
    *,
    smaps: torch.Tensor,
) -> tuple[torch.Tensor, MultiCoilMRI]:
    """Mask ``kspace`` (B, C, H, W) with fastMRI equispaced-fraction column masks.

    ``seeds[b]`` seeds slice ``b``'s mask exactly as fastMRI's ``MaskFunc(shape, seed=...)``
    (e.g. :func:`fastmri_seed` of the file name for evaluation); ``None`` (or no ``seeds``) draws
    the offset from NumPy's global random state (training). Returns the masked k-space and the
    operator ``A = P F S`` with a ``(B, 1, 1, W)`` mask and coil maps ``smaps``.
    """
    if kspace.dim() != 4 or not torch.is_complex(kspace):
        raise SpadeError(f"k-space must be complex (B, C, H, W), got {tuple(kspace.shape)} {kspace.dtype}")
    if smaps.shape != kspace.shape:
        raise SpadeError(f"coil maps {tuple(smaps.shape)} do not match k-space {tuple(kspace.shape)}")
    b, w = kspace.shape[0], kspace.shape[-1]
    if seeds is None:
        seeds = [None] * b
    if len(seeds) != b:
        raise SpadeError(f"{len(seeds)} mask seeds for a batch of {b}")
    masks = []
    for seed in seeds:
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        masks.append(equispaced_mask(w, center_fraction, acceleration, seed=seed))  # type: ignore[arg-type]
    mask = torch.from_numpy(np.stack(masks)).view(b, 1, 1, w).to(kspace.device)
    physics = MultiCoilMRI(mask, smaps.to(kspace.device))
    return kspace * physics.mask, physics


def acquire(
    batch: SliceBatch, acceleration: int, center_fraction: float, seeds: Sequence[MaskSeed] | None = None,
) -> tuple[torch.Tensor, MultiCoilMRI]:
    """The measurements of a collated batch and their operator ``A = P F S``.

    Each slice's mask is its file's acquisition ``mask`` when it has one (the k-space is used as
    acquired), else a fastMRI equispaced mask (``seeds`` as in :func:`undersample`). k-space
    outside the mask is zeroed. Coil maps are the file's ``sens_maps`` only when the dataset was
    opened with ``coil_maps="file"``; otherwise ESPIRiT maps estimated from the measurements'
    ACS block alone (the centre block of the equispaced mask, or the acquired mask's sampled
    centre run), so nothing outside the mask reaches the reconstruction.
    """
    kspace = batch["kspace"]
    b, w = kspace.shape[0], kspace.shape[-1]
    if seeds is None:
        seeds = [None] * b
    if len(seeds) != b:
        raise SpadeError(f"{len(seeds)} mask seeds for a batch of {b}")
    masks, blocks = [], []
    for acquired, seed in zip(batch["mask"], seeds):
        if acquired is not None:
            masks.append(acquired.float())
            blocks.append(acs_run(acquired.numpy()))
        else:
            if seed is None:
                seed = int(np.random.randint(0, 2**31 - 1))
            m = equispaced_mask(w, center_fraction, acceleration, seed=seed)  # type: ignore[arg-type]
            masks.append(torch.from_numpy(m))
            blocks.append(centre_block(w, center_fraction))
    mask = torch.stack(masks).view(b, 1, 1, w).to(kspace.device)
    y = kspace * mask
    if batch["smaps"] is not None:
        smaps = batch["smaps"]
    else:
        y_np = y.detach().cpu().numpy()
        smaps = torch.from_numpy(np.stack([batch["coil_maps"](y_np[i], blocks[i]) for i in range(b)]))
    return y, MultiCoilMRI(mask, smaps.to(kspace.device))


def sense_combine(kspace: torch.Tensor, smaps: torch.Tensor) -> torch.Tensor:
    """``sum_c conj(S_c) ifft2c(k_c)`` over the coil dimension (-3): (..., C, H, W) -> (..., H, W)."""
    return (smaps.conj() * ifft2c(kspace)).sum(dim=-3)


def make_batch(items: dict, acceleration: int, center_fraction: float, seeds: Sequence[Any] | None) -> Batch:
    """Measure a collated batch (:func:`acquire`: the file's mask or a fastMRI
    equispaced one, coil maps from the ACS block) and build the operator. ``x_gt`` is the fully
    sampled SENSE image of the same maps, only for fully sampled files with ground truth.
    ``meta``: ``maxval``, ``fnames``, ``slices``, ``recon_size`` (the header's, what reconstruct writes)."""
    y, physics = acquire(items, acceleration, center_fraction, seeds)
    has_gt = bool(items["has_target"].all())
    fully_sampled = all(m is None for m in items["mask"])
    x_gt = sense_combine(items["kspace"], physics.smaps) if has_gt and fully_sampled else None
    fnames, slices = list(items["fname"]), [int(s) for s in items["slice"]]
    return Batch(
        y=y,
        physics=physics,
        x_gt=x_gt,
        target=items["target"] if has_gt else None,
        keys=list(zip(fnames, slices)),
        meta={"maxval": items["maxval"], "fnames": fnames, "slices": slices,
              "recon_size": tuple(items["recon_size"])},
    )


def eval_seeds(items: dict) -> list[tuple[int, ...]]:
    """fastMRI's deterministic per-file mask seed."""
    return [fastmri_seed(f) for f in items["fname"]]
