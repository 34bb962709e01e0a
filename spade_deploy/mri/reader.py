"""fastMRI multi-coil files, read one slice at a time.

:class:`SliceDataset` reads fastMRI multi-coil HDF5 files (``kspace`` (slices, coils, H, W)
complex, optional ``reconstruction_rss`` (slices, h, w), ``ismrmrd_header``, attribute ``max``)
and ISMRMRD raw files (:class:`~spade_deploy.mri.ismrmrd_raw.RawFile`), checks a file's
acquisition ``mask`` (one 0/1 value per k-space column: the file is already undersampled) and
its header's recon size. Coil maps are never read by default: every reconstruction estimates
them from the acquisition (:mod:`.coilmaps`); a file's ``sens_maps`` (our simulation's true
maps) serve only when asked for (``coil_maps="file"``). :func:`collate` stacks items into a
batch; the task's sampler (:class:`~spade_deploy.tasks.ShapeBatchSampler`) batches slices of
equal shape (``group_key``), so one folder may mix sizes and coil counts.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence, TypedDict

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .coilmaps import CoilMapEstimator, EspiritParams, acs_run, espirit_from_acs
from ..errors import SpadeError
from .ismrmrd_raw import RawFile
from ..paths import memory_bytes
from .physics import ifft2c, rss

CoilMapSource = Literal["espirit", "file"]

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

    def volume_key(self, idx: int) -> int:
        """The file (volume) slice ``idx`` belongs to: what scores are averaged over."""
        return self._index[idx][0]

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
