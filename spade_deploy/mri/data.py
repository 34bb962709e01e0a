"""fastMRI multi-coil data: reader, coil maps, masks, and the embedded default dataset.

Reader
    :class:`SliceDataset` reads fastMRI multi-coil HDF5 files (``kspace`` (slices, coils, H, W)
    complex, optional ``reconstruction_rss`` (slices, h, w), ``ismrmrd_header``, attribute ``max``)
    one slice at a time, checks a file's acquisition ``mask`` (one 0/1 value per k-space column:
    the file is already undersampled) and its header's recon size. Coil maps are never read by
    default: every reconstruction estimates them from the acquisition (:mod:`.coilmaps`); a
    file's ``sens_maps`` (our simulation's true maps) serve only when asked for
    (``coil_maps="file"``). :func:`collate` stacks items into a batch; the task's sampler
    (:class:`~spade_deploy.tasks.ShapeBatchSampler`) batches slices of equal shape (``group_key``),
    so one folder may mix sizes and coil counts.

Masks
    :func:`undersample` applies fastMRI equispaced-fraction masks (with fastMRI's per-file seed
    ``tuple(map(ord, fname))`` for evaluation) and returns the measurements with their
    :class:`~spade_deploy.mri.physics.MultiCoilMRI` operator.

Embedded default dataset
    :func:`build_default_dataset` simulates multi-coil k-space from the real MR brain template
    that ships inside the ``nilearn`` package (``nilearn/datasets/data``): the MNI ICBM152 2009a
    nonlinear symmetric T1-weighted template and its grey- and white-matter probability maps
    (1 mm, 197x233x189; Fonov et al., NeuroImage 2011 / 2009; Collins et al. 1999). Nothing is
    downloaded. Each simulated subject is a different contrast (a positive mixture from T1- to
    T2-like of the template's T1 image and its GM / WM / CSF maps) with a small random in-plane
    rotation, shift and scale; axial slices from the central brain region are resampled to
    ``size x size`` (default 160, 1.5 mm pixels over a 240 mm field of view), given a smooth random
    phase, multiplied by smooth coil sensitivities (wire-like sources on a ring around the field of
    view, normalised to ``sum_c |S_c|^2 = 1``), Fourier transformed, and corrupted by complex
    Gaussian noise (``snr`` = mean brain magnitude of the coil-combined image over the noise
    standard deviation of one coil image).

    Licence of the template images: the ICBM 2009 templates are distributed by the McConnell Brain
    Imaging Centre with the notice "Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging
    Centre, Montreal Neurological Institute, McGill University. Permission to use, copy, modify,
    and distribute this software and its documentation for any purpose and without fee is hereby
    granted, provided that the above copyright notice appear in all copies. The authors and McGill
    University make no representations about the suitability of this software for any purpose. It
    is provided "as is" without express or implied warranty." (as reproduced in TemplateFlow's
    ``tpl-MNI152NLin2009cAsym/LICENSE``; nilearn's own dataset description lists the licence as
    "unknown" and ships the files inside its BSD-licensed package). Every generated
    ``dataset.json`` repeats this notice.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.resources
import json
import math
import os
import shutil
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypedDict

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .coilmaps import CoilMapEstimator, EspiritParams, acs_run, centre_block, espirit_from_acs
from ..errors import SpadeError
from .ismrmrd_raw import RawFile
from ..io import write_json
from ..paths import memory_bytes
from ..tasks import Batch
from .physics import MultiCoilMRI, equispaced_mask, fft2c, ifft2c, rss

CoilMapSource = Literal["espirit", "file"]
MaskSeed = int | tuple[int, ...] | None

TEMPLATE_NOTICE = (
    "MNI ICBM152 2009a nonlinear symmetric template (as shipped in nilearn). Copyright (C) 1993-2004 "
    "Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University. "
    "Permission to use, copy, modify, and distribute this software and its documentation for any purpose "
    "and without fee is hereby granted, provided that the above copyright notice appear in all copies. "
    "The authors and McGill University make no representations about the suitability of this software "
    'for any purpose. It is provided "as is" without express or implied warranty.'
)


# ================================================================================================
# Reader
# ================================================================================================
class SliceItem(TypedDict):
    """One slice. ``target`` is ground truth only where ``has_target`` is true."""

    kspace: torch.Tensor  # (C, H, W) complex64, as stored (fully sampled unless ``mask``)
    mask: torch.Tensor | None  # (W,) float32 acquisition mask of the file, None: fully sampled
    smaps: torch.Tensor | None  # (C, H, W) the file's sens_maps, only with coil_maps="file"
    target: torch.Tensor  # (h, w) float32: reconstruction_rss, else the RSS of the stored k-space
    has_target: bool  # False when the file has no reconstruction_rss
    maxval: float  # attribute ``max``, else target.max() over the volume
    recon_size: tuple[int, int]  # the header's reconSpace matrix (x, y), within (H, W)
    fname: str  # file name, e.g. "file_brain_001.h5" (fastMRI's mask-seed key)
    slice: int
    coil_maps: CoilMapEstimator  # how the reconstruction's maps are estimated


class SliceBatch(TypedDict):
    """A collated batch of :class:`SliceItem`."""

    kspace: torch.Tensor  # (B, C, H, W) complex64
    mask: list[torch.Tensor | None]  # per slice: the file's acquisition mask (W,) or None
    smaps: torch.Tensor | None  # (B, C, H, W) the files' sens_maps, only with coil_maps="file"
    target: torch.Tensor  # (B, h, w) float32
    has_target: torch.Tensor  # (B,) bool
    maxval: torch.Tensor  # (B,) float32
    recon_size: tuple[int, int]
    fname: list[str]
    slice: torch.Tensor  # (B,) int64
    coil_maps: CoilMapEstimator


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    n_slices: int
    shape: tuple[int, int, int]  # (C, H, W)
    has_rss: bool
    has_smaps: bool
    max_attr: float | None
    mask: np.ndarray | None  # (W,) float32 acquisition mask, checked
    recon_size: tuple[int, int]  # header reconSpace (x, y) = (rows, columns), clipped to (H, W)
    rss_shape: tuple[int, int] | None
    raw: RawFile | None = None  # an ISMRMRD raw file; None: fastMRI layout

    @property
    def group(self) -> tuple:
        """Slices with equal keys can share a batch."""
        return (self.shape, self.rss_shape, self.recon_size)


class SliceDataset(Dataset):
    """Slices of fastMRI multi-coil HDF5 files, indexed lazily (one slice is read per item).

    ``root`` is one ``.h5`` file or a folder of them (not searched recursively); ISMRMRD raw
    files (``/dataset/xml`` + ``/dataset/data``) are read too, each slice with the mask of the
    lines it holds (:class:`spade_deploy.mri.ismrmrd_raw.RawFile`). ``coil_maps``:
    ``"espirit"`` (default) estimates every reconstruction's maps from the ACS block of the mask
    used (:class:`~spade_deploy.mri.coilmaps.CoilMapEstimator`, cached under ``cache_dir``, default
    the user's cache home, never the data folder); ``"file"`` hands the file's ``sens_maps`` to
    the reconstruction instead (a reference, e.g. the simulation's true maps, never a default).
    Invalid input (including a malformed ``mask``) raises :class:`SpadeError` naming the file.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        coil_maps: CoilMapSource = "espirit",
        cache_dir: str | os.PathLike | None = None,
        espirit: EspiritParams = EspiritParams(),
    ):
        if coil_maps not in ("espirit", "file"):
            raise SpadeError(f"unknown coil-map source {coil_maps!r}; choose espirit or file")
        root = Path(root)
        if not root.exists():
            raise SpadeError(f"data path {root} does not exist (missing file or folder)")
        if root.is_dir():
            files = sorted(p for p in root.glob("*.h5") if p.is_file())
            if not files:
                raise SpadeError(f"no .h5 files in {root}")
        else:
            files = [root]
        self.root = root
        self.coil_maps: CoilMapSource = coil_maps
        self.estimator = CoilMapEstimator(cache_dir, espirit)
        self._infos = [_inspect(p) for p in files]
        if coil_maps == "file":
            for info in self._infos:
                if not info.has_smaps:
                    raise SpadeError(f"{info.path}: no sens_maps dataset; use coil maps 'espirit'")
        self._index = [(i, s) for i, info in enumerate(self._infos) for s in range(info.n_slices)]
        self._maxvals: dict[int, float] = {}

    @property
    def files(self) -> list[Path]:
        return [info.path for info in self._infos]

    def group_key(self, idx: int) -> tuple:
        """Slices of equal key (k-space shape, target shape, recon size) can share a batch."""
        return self._infos[self._index[idx][0]].group

    @property
    def fully_sampled(self) -> bool:
        """True when no file carries an acquisition mask (its k-space is complete)."""
        return all(info.mask is None for info in self._infos)

    @property
    def has_ground_truth(self) -> bool:
        """True when every file has ``reconstruction_rss``."""
        return all(info.has_rss for info in self._infos)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, idx: int) -> SliceItem:
        if not -len(self) <= idx < len(self):
            raise IndexError(idx)
        fi, s = self._index[idx]
        info = self._infos[fi]
        mask, smaps, target = info.mask, None, None
        if info.raw is not None:  # each slice of a raw file has its own mask
            kspace, mask = info.raw.read_slice(s)
        else:
            with _open(info.path) as f:
                kspace = _finite(f["kspace"][s], info.path, s, "kspace").astype(np.complex64, copy=False)
                if self.coil_maps == "file":
                    smaps = _finite(f["sens_maps"][s], info.path, s, "sens_maps").astype(np.complex64, copy=False)
                if info.has_rss:
                    target = _finite(f["reconstruction_rss"][s], info.path, s, "reconstruction_rss").astype(np.float32)
        k = torch.from_numpy(np.ascontiguousarray(kspace))
        if target is None:
            target_t = rss(ifft2c(k), dim=0).float()
        else:
            target_t = torch.from_numpy(np.ascontiguousarray(target))
        return SliceItem(
            kspace=k,
            mask=torch.from_numpy(mask) if mask is not None else None,
            smaps=torch.from_numpy(np.ascontiguousarray(smaps)) if smaps is not None else None,
            target=target_t,
            has_target=info.has_rss,
            maxval=self.volume_maxval(fi),
            recon_size=info.recon_size,
            fname=info.path.name,
            slice=s,
            coil_maps=self.estimator,
        )

    def volume_maxval(self, file_index: int) -> float:
        """Attribute ``max`` of the file, else the maximum of its target volume (memoised)."""
        if file_index not in self._maxvals:
            info = self._infos[file_index]
            if info.max_attr is not None:
                value = info.max_attr
            elif info.raw is not None:
                value = max(float(rss(ifft2c(torch.from_numpy(info.raw.read_slice(s)[0])), dim=0).max())
                            for s in range(info.n_slices))
            else:
                with _open(info.path) as f:
                    if info.has_rss:
                        value = float(np.max(f["reconstruction_rss"][()]))
                    else:
                        value = max(
                            float(rss(ifft2c(torch.from_numpy(f["kspace"][s].astype(np.complex64))), dim=0).max())
                            for s in range(info.n_slices)
                        )
            self._maxvals[file_index] = value
        return self._maxvals[file_index]


def espirit_maps(kspace: np.ndarray, acs: tuple[int, int], params: EspiritParams = EspiritParams()) -> np.ndarray:
    """ESPIRiT coil maps of one slice ``(C, H, W)`` from its ACS columns ``acs`` only (see
    :func:`~spade_deploy.mri.coilmaps.espirit_from_acs`)."""
    return espirit_from_acs(kspace, acs, params)


def acquired_mask(path: Path, f: h5py.File, width: int) -> np.ndarray | None:
    """The file's acquisition mask (fastMRI test / challenge files: one 0/1 value per k-space
    column; their k-space is already undersampled), or None. A mask that cannot belong to the
    file's k-space is refused: a wrong width, a 2-D array, values other than 0/1 (NaN included),
    no sampled column, no sampled centre column (nothing to calibrate coil maps on)."""
    if "mask" not in f:
        return None
    ds = f["mask"]
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] != width:
        shape = getattr(ds, "shape", None)
        raise SpadeError(f"{path}: mask of shape {shape} does not match kspace of width {width} (expected ({width},))")
    if ds.dtype.kind not in "biuf":
        raise SpadeError(f"{path}: mask must be numeric 0/1, got {ds.dtype}")
    mask = np.asarray(ds[()]).astype(np.float32)
    if not np.isin(mask, (0.0, 1.0)).all():  # NaN fails this too
        raise SpadeError(f"{path}: mask must hold only 0 and 1 (one value per k-space column)")
    if not mask.any():
        raise SpadeError(f"{path}: mask samples no k-space column")
    try:
        acs_run(mask)
    except SpadeError as exc:
        raise SpadeError(f"{path}: {exc}") from None
    return mask


def recon_size(path: Path, f: h5py.File, shape: tuple[int, int]) -> tuple[int, int]:
    """The ismrmrd header's reconSpace matrix ``(x, y)``, fastMRI's crop of the image ``(H, W)``
    (e.g. 320 x 320 of a 640 x 320 readout-oversampled k-space); ``(H, W)`` without a header.
    Each side is clipped to the image."""
    h, w = shape
    if "ismrmrd_header" not in f:
        return h, w
    try:
        raw = f["ismrmrd_header"][()]
        text = raw.decode() if isinstance(raw, (bytes, np.bytes_)) else str(raw)
        root = ET.fromstring(text)
    except (ET.ParseError, UnicodeDecodeError, TypeError, ValueError, OSError):
        raise SpadeError(f"{path}: ismrmrd_header is not readable XML") from None
    ns = {"m": "http://www.ismrm.org/ISMRMRD"}
    found = [root.find(f"m:encoding/m:reconSpace/m:matrixSize/m:{a}", ns) for a in ("x", "y")]
    if any(e is None for e in found):
        found = [root.find(f"encoding/reconSpace/matrixSize/{a}") for a in ("x", "y")]
    if any(e is None for e in found):
        return h, w
    try:
        x, y = (int(e.text) for e in found)  # type: ignore[union-attr, arg-type]
    except (TypeError, ValueError):
        raise SpadeError(f"{path}: ismrmrd_header reconSpace matrixSize is not a pair of integers") from None
    if x < 1 or y < 1:
        raise SpadeError(f"{path}: ismrmrd_header reconSpace matrixSize ({x}, {y}) is not positive")
    return min(x, h), min(y, w)


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise SpadeError(f"{path} is not a readable HDF5 file ({str(exc).splitlines()[0]})") from None


def _inspect(path: Path) -> _FileInfo:
    with _open(path) as f:
        if "kspace" not in f and "dataset" in f:  # ISMRMRD raw (/dataset/xml + /dataset/data)
            raw = RawFile(path)
            return _FileInfo(path=path, n_slices=raw.n_slices, shape=raw.shape, has_rss=False, has_smaps=False,
                             max_attr=None, mask=raw.file_mask, recon_size=raw.encoding.recon, rss_shape=None, raw=raw)
        if "kspace" not in f:
            raise SpadeError(f"{path} has no 'kspace' dataset; not a fastMRI multi-coil file")
        k = f["kspace"]
        if not isinstance(k, h5py.Dataset):
            raise SpadeError(f"{path}: 'kspace' is not a dataset")
        if k.ndim != 4:
            raise SpadeError(
                f"{path}: kspace has rank {k.ndim} (shape {k.shape}); expected 4-D (slices, coils, H, W)"
                + ("; single-coil data is not supported" if k.ndim == 3 else "")
            )
        if k.dtype.kind != "c":
            raise SpadeError(f"{path}: kspace must be complex, got {k.dtype}")
        if k.shape[0] == 0 or min(k.shape[1:]) == 0:
            raise SpadeError(f"{path}: kspace {k.shape} is empty")
        n, c, h, w = k.shape
        # A slice is held several times over (coil maps, FFTs): refuse one above 1/16 of memory or
        # 2 GiB (40 times a fastMRI brain slice) before anything is read.
        if c * h * w * 8 > min(memory_bytes() // 16, 2 << 30):
            raise SpadeError(f"{path}: a kspace slice of {c} x {h} x {w} ({c * h * w * 8 / 2**30:,.1f} GiB) would not "
                             "fit in this machine's memory; refusing the file")
        has_smaps = "sens_maps" in f
        if has_smaps and f["sens_maps"].shape != k.shape:
            raise SpadeError(f"{path}: sens_maps of shape {f['sens_maps'].shape} does not match kspace {k.shape}")
        if has_smaps and f["sens_maps"].dtype.kind != "c":
            raise SpadeError(f"{path}: sens_maps must be complex, got {f['sens_maps'].dtype}")
        has_rss = "reconstruction_rss" in f
        if has_rss:
            r = f["reconstruction_rss"].shape
            if len(r) != 3 or r[0] != n or r[1] > h or r[2] > w:
                raise SpadeError(
                    f"{path}: reconstruction_rss of shape {r} does not fit kspace {k.shape} "
                    "(expected (slices, h, w) with h <= H and w <= W)"
                )
        max_attr = f.attrs.get("max")
        return _FileInfo(
            path=path,
            n_slices=n,
            shape=(c, h, w),
            has_rss=has_rss,
            has_smaps=has_smaps,
            max_attr=float(max_attr) if max_attr is not None else None,
            mask=acquired_mask(path, f, w),
            recon_size=recon_size(path, f, (h, w)),
            rss_shape=tuple(f["reconstruction_rss"].shape[1:]) if has_rss else None,
        )


def _finite(a: np.ndarray, path: Path, s: int, name: str) -> np.ndarray:
    if not np.isfinite(a).all():
        raise SpadeError(f"{path}: slice {s} of {name} contains NaN or inf values")
    return a


def collate(items: Sequence[SliceItem]) -> SliceBatch:
    """Stack slices of equal size into a batch; slices of different sizes raise :class:`SpadeError`
    (:class:`ShapeBatchSampler` never mixes them)."""
    if not items:
        raise SpadeError("cannot collate an empty batch")
    first = items[0]
    for it in items[1:]:
        if (it["kspace"].shape != first["kspace"].shape or it["target"].shape != first["target"].shape
                or it["recon_size"] != first["recon_size"]):
            raise SpadeError(
                f"cannot batch slices of different sizes: {it['fname']} {tuple(it['kspace'].shape)} vs "
                f"{first['fname']} {tuple(first['kspace'].shape)}; use a batch size of 1"
            )
    with_maps = [it["smaps"] is not None for it in items]
    if any(with_maps) and not all(with_maps):
        raise SpadeError("cannot batch slices with and without file coil maps")
    return SliceBatch(
        kspace=torch.stack([it["kspace"] for it in items]),
        mask=[it["mask"] for it in items],
        smaps=torch.stack([it["smaps"] for it in items]) if all(with_maps) else None,  # type: ignore[misc]
        target=torch.stack([it["target"] for it in items]),
        has_target=torch.tensor([it["has_target"] for it in items], dtype=torch.bool),
        maxval=torch.tensor([it["maxval"] for it in items], dtype=torch.float32),
        recon_size=first["recon_size"],
        fname=[it["fname"] for it in items],
        slice=torch.tensor([it["slice"] for it in items], dtype=torch.int64),
        coil_maps=first["coil_maps"],
    )


# ================================================================================================
# Masks and coil combination
# ================================================================================================
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


# ================================================================================================
# Embedded default dataset
# ================================================================================================
GENERATOR_VERSION = 1
SPLITS = ("train", "val", "test")
# Template axial planes (voxel z, 1 mm) of the central brain region (MNI z = -22 .. +61 mm), cut
# into blocks assigned to splits in this order; planes within GUARD_MM of another split's block
# are dropped, so planes of different splits are at least 2 * GUARD_MM + 1 mm apart.
CENTRAL_Z = (50, 134)
BLOCK_MM = 12
BLOCK_PATTERN = ("train", "test", "train", "val", "train", "test", "train")
GUARD_MM = 2


@dataclass(frozen=True)
class SimConfig:
    """Sizes and physics of the simulated dataset (all recorded in ``dataset.json``)."""

    train_volumes: int = 10
    train_slices: int = 8
    val_volumes: int = 2
    val_slices: int = 4
    test_volumes: int = 2
    test_slices: int = 6
    size: int = 160  # image matrix (size x size)
    fov_mm: float = 240.0
    n_coils: int = 8
    # mean magnitude of the coil-combined image over the brain (pixels above 10 % of its 99th
    # percentile) divided by the complex noise standard deviation of one coil image
    snr: float = 100.0

    def counts(self, split: str) -> tuple[int, int]:
        return getattr(self, f"{split}_volumes"), getattr(self, f"{split}_slices")

    def validate(self) -> None:
        for split in SPLITS:
            v, s = self.counts(split)
            if v < 1 or s < 1:
                raise SpadeError(f"{split}: need at least one volume of at least one slice, got {v} x {s}")
        if self.size < 16 or self.n_coils < 1 or self.snr <= 0 or self.fov_mm <= 0:
            raise SpadeError(f"invalid simulation settings: {self}")


@dataclass(frozen=True)
class SplitInfo:
    files: tuple[str, ...]
    n_slices: int


@dataclass(frozen=True)
class DatasetInfo:
    """What :func:`build_default_dataset` produced (or found)."""

    root: Path
    seed: int
    config: SimConfig
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    reused: bool = False
    seconds: float = 0.0


ProgressFn = Callable[[int, int], None]


def default_data_root() -> Path:
    """``$SPADE_DATA``, else ``./data/default``."""
    return Path(os.environ.get("SPADE_DATA") or Path("data") / "default")


def build_default_dataset(
    root: str | os.PathLike,
    seed: int = 0,
    force: bool = False,
    progress: ProgressFn | None = None,
    config: SimConfig | None = None,
) -> DatasetInfo:
    """Build (or reuse) the simulated multi-coil brain dataset under ``root/{train,val,test}``.

    A complete build with the same seed and settings is reused unless ``force``. The new build is
    written into a temporary folder beside ``root`` with ``dataset.json`` last and then renamed, so
    an interrupted build never leaves a folder that looks complete. ``progress(done, total)`` is
    called after each volume.
    """
    config = config or SimConfig()
    config.validate()
    if not isinstance(seed, int) or seed < 0:
        raise SpadeError(f"seed must be a non-negative integer, got {seed!r}")
    planes = split_planes()
    for split in SPLITS:
        if config.counts(split)[1] > len(planes[split]):
            raise SpadeError(
                f"{split}: {config.counts(split)[1]} slices per volume requested but the template offers "
                f"only {len(planes[split])} planes to this split"
            )
    root = Path(root)
    manifest_key = _manifest_key(seed, config)
    if root.exists() and not root.is_dir():
        raise SpadeError(f"dataset root {root} is a file, expected a folder")
    existing = _read_manifest(root)
    if existing is not None and not force and _complete(root, existing, manifest_key):
        return _info_from_manifest(root, existing, reused=True)
    if root.exists() and existing is None and any(root.iterdir()):
        raise SpadeError(f"{root} exists and is not a spade-deploy default dataset; choose another --root")

    t0 = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        manifest = _simulate_into(tmp, seed, config, progress)
        manifest["seconds"] = round(time.perf_counter() - t0, 3)
        write_json(tmp / "dataset.json", {**manifest_key, **manifest})
        _replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _info_from_manifest(root, _read_manifest(root) or {}, reused=False)


def _manifest_key(seed: int, config: SimConfig) -> dict:
    return {
        "format": "spade-deploy/default-dataset",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "config": dataclasses.asdict(config),
    }


def _read_manifest(root: Path) -> dict | None:
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("format") == "spade-deploy/default-dataset" else None


def _complete(root: Path, manifest: dict, key: dict) -> bool:
    if any(manifest.get(k) != v for k, v in key.items()):
        return False
    splits = manifest.get("splits", {})
    return all(
        all((root / split / f).is_file() for f in splits.get(split, {}).get("files", [])) for split in SPLITS
    ) and set(splits) == set(SPLITS)


def _info_from_manifest(root: Path, manifest: dict, reused: bool) -> DatasetInfo:
    splits = {
        s: SplitInfo(files=tuple(v["files"]), n_slices=int(v["n_slices"]))
        for s, v in manifest.get("splits", {}).items()
    }
    return DatasetInfo(
        root=root,
        seed=int(manifest["seed"]),
        config=SimConfig(**manifest["config"]),
        splits=splits,
        reused=reused,
        seconds=float(manifest.get("seconds", 0.0)),
    )


def _replace_dir(new: Path, root: Path) -> None:
    """Move ``new`` onto ``root``; an old build at ``root`` is moved aside first, then deleted."""
    old = None
    if root.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        os.replace(root, old / "data")
    os.replace(new, root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Template:
    """Axial planes ``CENTRAL_Z[0] <= z < CENTRAL_Z[1]`` of the template, each (rows, cols) float32.

    Rows run anterior -> posterior, columns along the template's x axis; 1 mm pixels.
    """

    t1: np.ndarray  # (Z, rows, cols), brain intensities normalised so the 99th percentile is 1
    gm: np.ndarray  # grey-matter probability
    wm: np.ndarray  # white-matter probability
    support: np.ndarray  # brain support, interior holes (ventricles cut by skull-stripping) filled
    center: tuple[float, float]  # brain centre (row, col)

    def planes(self, z: int) -> tuple[np.ndarray, ...]:
        i = z - CENTRAL_Z[0]
        return self.t1[i], self.gm[i], self.wm[i], self.support[i]


def _template_dir() -> Path:
    return Path(str(importlib.resources.files("nilearn.datasets") / "data"))


@functools.lru_cache(maxsize=1)
def _load_template() -> _Template:
    import nibabel as nib
    from scipy import ndimage

    folder = _template_dir()
    axial = {}
    for name in ("t1", "gm", "wm"):
        path = folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.is_file():
            raise SpadeError(f"the MNI template {path.name} is missing from the installed nilearn ({folder})")
        vol = np.asarray(nib.load(str(path)).dataobj)
        # (x, y, z) -> (z, rows = y reversed, cols = x)
        central = vol[:, ::-1, CENTRAL_Z[0] : CENTRAL_Z[1]].transpose(2, 1, 0)
        axial[name] = np.ascontiguousarray(central, dtype=np.float32)
    t1 = axial["t1"]
    brain = t1 > 0
    support = np.stack([ndimage.binary_fill_holes(b) for b in brain]).astype(np.float32)
    rows, cols = np.nonzero(brain.any(axis=0))
    center = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2)
    return _Template(
        t1=t1 / np.percentile(t1[brain], 99),
        gm=axial["gm"] / 255.0,
        wm=axial["wm"] / 255.0,
        support=support,
        center=center,
    )


def split_planes() -> dict[str, list[int]]:
    """Template axial planes (voxel z) available to each split; disjoint, with guard gaps."""
    z = np.arange(*CENTRAL_Z)
    owner = [BLOCK_PATTERN[((zz - CENTRAL_Z[0]) // BLOCK_MM) % len(BLOCK_PATTERN)] for zz in z]
    out: dict[str, list[int]] = {s: [] for s in SPLITS}
    for i, zz in enumerate(z):
        near = owner[max(0, i - GUARD_MM) : i + GUARD_MM + 1]
        if all(o == owner[i] for o in near):
            out[owner[i]].append(int(zz))
    return out


def _pick_planes(pool: list[int], n: int, rng: np.random.Generator) -> list[int]:
    """``n`` distinct planes spread over ``pool``: one drawn at random from each of ``n`` strata."""
    step = len(pool) / n
    return [pool[min(len(pool) - 1, int(math.floor(step * i + rng.uniform(0, step))))] for i in range(n)]


def _simulate_into(folder: Path, seed: int, cfg: SimConfig, progress: ProgressFn | None) -> dict:
    tpl = _load_template()
    planes = split_planes()
    total = sum(cfg.counts(s)[0] for s in SPLITS)
    done, subject = 0, 0
    splits: dict[str, dict] = {}
    if progress:
        progress(0, total)
    for split in SPLITS:
        n_vol, n_sl = cfg.counts(split)
        (folder / split).mkdir()
        files, z_used = [], {}
        for _ in range(n_vol):
            rng = np.random.default_rng([seed, subject])
            zs = _pick_planes(planes[split], n_sl, rng)
            vol = _simulate_volume(tpl, zs, cfg, rng)
            fname = f"sim_brain_{vol.acquisition}_{subject:03d}.h5"
            _write_fastmri(folder / split / fname, vol, cfg, subject, zs)
            files.append(fname)
            z_used[fname] = zs
            subject += 1
            done += 1
            if progress:
                progress(done, total)
        splits[split] = {"files": files, "n_slices": n_vol * n_sl, "template_planes": z_used}
    return {
        "splits": splits,
        "source": {
            "template": "MNI ICBM152 2009a nonlinear symmetric (T1, GM, WM), via nilearn",
            "nilearn_version": importlib.metadata.version("nilearn"),
            "licence": TEMPLATE_NOTICE,
        },
        "split_planes": {"central_z": list(CENTRAL_Z), "block_mm": BLOCK_MM, "guard_mm": GUARD_MM,
                         "pattern": list(BLOCK_PATTERN)},
    }


@dataclass
class _Volume:
    kspace: np.ndarray  # (S, C, N, N) complex64
    smaps: np.ndarray  # (S, C, N, N) complex64
    rss: np.ndarray  # (S, N, N) float32
    acquisition: str
    contrast: float  # 0 = T1-like ... 1 = T2-like


def _simulate_volume(tpl: _Template, zs: list[int], cfg: SimConfig, rng: np.random.Generator) -> _Volume:
    from scipy import ndimage

    n = cfg.size
    pix = cfg.fov_mm / n
    # subject: contrast and pose
    t = float(rng.uniform(0.0, 1.0))
    w_t2 = np.array([1.0, rng.uniform(0.5, 0.7), rng.uniform(0.3, 0.45)])  # CSF, GM, WM
    w_t1 = np.array([rng.uniform(0.0, 0.1), rng.uniform(0.0, 0.1), rng.uniform(0.0, 0.1)])
    theta = math.radians(rng.uniform(-10.0, 10.0))
    scale = rng.uniform(0.92, 1.08)
    shift = rng.uniform(-8.0, 8.0, size=2)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    matrix = (pix / scale) * rot
    offset = np.asarray(tpl.center) + shift - matrix @ np.full(2, (n - 1) / 2)
    sigma = 0.45 * pix / scale if pix / scale > 1 else 0.0
    coils = _coil_params(cfg.n_coils, rng)

    images, smaps = [], []
    for z in zs:
        layers = []
        for plane in tpl.planes(z):
            if sigma:
                plane = ndimage.gaussian_filter(plane, sigma)
            resampled = ndimage.affine_transform(plane, matrix, offset, output_shape=(n, n), order=3)
            layers.append(np.clip(resampled, 0, None))
        t1, gm, wm, support = layers
        csf = np.clip(support - gm - wm, 0.0, 1.0)
        t2 = w_t2[0] * csf + w_t2[1] * gm + w_t2[2] * wm
        mag = (1 - t) * (t1 + w_t1[0] * csf + w_t1[1] * gm + w_t1[2] * wm) + t * t2
        images.append(mag * np.exp(1j * _smooth_phase(n, rng)))
        smaps.append(_coil_maps(n, (z - sum(CENTRAL_Z) / 2) / (cfg.fov_mm / 2), coils))
    x = np.stack(images)  # (S, N, N)
    brain = np.abs(x) > 0.1 * np.abs(x).max()
    x = x / np.percentile(np.abs(x)[brain], 99)
    s = np.stack(smaps)  # (S, C, N, N)
    sigma_noise = np.abs(x)[np.abs(x) > 0.1].mean() / cfg.snr
    k = fft2c(torch.from_numpy(s * x[:, None])).numpy()
    noise = rng.standard_normal(k.shape + (2,)) @ np.array([1.0, 1j]) * (sigma_noise / math.sqrt(2))
    k = (k + noise).astype(np.complex64)
    r = rss(ifft2c(torch.from_numpy(k)), dim=1).numpy().astype(np.float32)
    return _Volume(
        kspace=k, smaps=s.astype(np.complex64), rss=r, acquisition="AXT1" if t < 0.5 else "AXT2", contrast=t
    )


def _smooth_phase(n: int, rng: np.random.Generator) -> np.ndarray:
    """Random quadratic phase over the field of view (radians)."""
    y, x = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    c = rng.normal(0.0, [0.6, 0.6, 0.4, 0.4, 0.4])
    return rng.uniform(-np.pi, np.pi) + c[0] * x + c[1] * y + c[2] * x * x + c[3] * y * y + c[4] * x * y


@dataclass(frozen=True)
class _Coils:
    pos: np.ndarray  # (C, 2) in-plane centres (row, col), field of view = [-1, 1]^2
    z: np.ndarray  # (C,) axial offsets
    gain: np.ndarray  # (C,) complex


def _coil_params(n_coils: int, rng: np.random.Generator) -> _Coils:
    radius = rng.uniform(1.25, 1.6)
    ang = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(n_coils) / n_coils
    ang = ang + rng.normal(0, 0.1 * 2 * np.pi / n_coils, n_coils)
    ellipse = rng.uniform(0.9, 1.1)
    pos = np.stack([radius * ellipse * np.sin(ang), radius / ellipse * np.cos(ang)], axis=1)
    gain = np.exp(rng.normal(0, 0.15, n_coils) + 1j * rng.uniform(-np.pi, np.pi, n_coils))
    return _Coils(pos=pos, z=rng.normal(0, 0.1, n_coils), gain=gain)


def _coil_maps(n: int, z: float, coils: _Coils, height: float = 0.35) -> np.ndarray:
    """Wire-like sources on a ring: |S_c| ~ 1/(d^2 + h^2)^0.75, phase turning around each source.

    Normalised so that ``sum_c |S_c|^2 = 1`` at every pixel.
    """
    y, x = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, n), indexing="ij")
    dy = y[None] - coils.pos[:, 0, None, None]
    dx = x[None] - coils.pos[:, 1, None, None]
    d2 = dx**2 + dy**2 + (z - coils.z[:, None, None]) ** 2 + height**2
    s = coils.gain[:, None, None] * np.exp(1j * np.arctan2(dy, dx)) / d2**0.75
    return s / np.sqrt((np.abs(s) ** 2).sum(0, keepdims=True))


def _ismrmrd_header(n: int, fov_mm: float, n_coils: int) -> str:
    space = (
        f"<matrixSize><x>{n}</x><y>{n}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fov_mm:g}</x><y>{fov_mm:g}</y><z>5</z></fieldOfView_mm>"
    )
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
        f"<acquisitionSystemInformation><receiverChannels>{n_coils}</receiverChannels></acquisitionSystemInformation>"
        "<experimentalConditions><H1resonanceFrequency_Hz>63600000</H1resonanceFrequency_Hz></experimentalConditions>"
        f"<encoding><encodedSpace>{space}</encodedSpace><reconSpace>{space}</reconSpace>"
        "<encodingLimits>"
        f"<kspace_encoding_step_1><minimum>0</minimum><maximum>{n - 1}</maximum><center>{n // 2}</center>"
        "</kspace_encoding_step_1>"
        "</encodingLimits><trajectory>cartesian</trajectory></encoding>"
        "</ismrmrdHeader>"
    )


def _write_fastmri(path: Path, vol: _Volume, cfg: SimConfig, subject: int, zs: list[int]) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=vol.kspace, track_times=False)
        f.create_dataset("reconstruction_rss", data=vol.rss, track_times=False)
        f.create_dataset("sens_maps", data=vol.smaps, track_times=False)
        header = np.bytes_(_ismrmrd_header(cfg.size, cfg.fov_mm, cfg.n_coils))
        f.create_dataset("ismrmrd_header", data=header, track_times=False)
        f.attrs["max"] = float(vol.rss.max())
        f.attrs["norm"] = float(np.linalg.norm(vol.rss))
        f.attrs["acquisition"] = vol.acquisition
        f.attrs["patient_id"] = f"sim{subject:03d}"
        f.attrs["contrast_t1_to_t2"] = vol.contrast
        f.attrs["template_planes"] = np.asarray(zs, dtype=np.int32)
        f.attrs["snr"] = cfg.snr
