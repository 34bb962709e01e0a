"""The embedded default dataset: multi-coil k-space simulated from a real brain template.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from ..errors import SpadeError
from ..io import write_json
from .physics import fft2c, ifft2c, rss

TEMPLATE_NOTICE = (
    "MNI ICBM152 2009a nonlinear symmetric template (as shipped in nilearn). Copyright (C) 1993-2004 "
    "Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University. "
    "Permission to use, copy, modify, and distribute this software and its documentation for any purpose "
    "and without fee is hereby granted, provided that the above copyright notice appear in all copies. "
    "The authors and McGill University make no representations about the suitability of this software "
    'for any purpose. It is provided "as is" without express or implied warranty.'
)

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
    k, s, r = acquire(np.stack(images), np.stack(smaps), cfg.snr, rng)
    return _Volume(kspace=k, smaps=s, rss=r, acquisition="AXT1" if t < 0.5 else "AXT2", contrast=t)


def acquire(x: np.ndarray, smaps: np.ndarray, snr: float, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The acquisition of complex images ``x`` (S, N, N) by coils ``smaps`` (S, C, N, N): the
    images scaled so the 99th percentile of the brain's magnitude (pixels above 10 % of the peak)
    is one, Fourier transformed per coil, with complex Gaussian noise at ``snr``. Returns
    ``(kspace, smaps, rss)`` as complex64 / complex64 / float32 (the fastMRI file's datasets)."""
    brain = np.abs(x) > 0.1 * np.abs(x).max()
    x = x / np.percentile(np.abs(x)[brain], 99)
    sigma_noise = np.abs(x)[np.abs(x) > 0.1].mean() / snr
    k = fft2c(torch.from_numpy(smaps * x[:, None])).numpy()
    noise = rng.standard_normal(k.shape + (2,)) @ np.array([1.0, 1j]) * (sigma_noise / math.sqrt(2))
    k = (k + noise).astype(np.complex64)
    r = rss(ifft2c(torch.from_numpy(k)), dim=1).numpy().astype(np.float32)
    return k, smaps.astype(np.complex64), r


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
    write_fastmri(path, vol.kspace, vol.smaps, vol.rss, cfg, {
        "acquisition": vol.acquisition, "patient_id": f"sim{subject:03d}", "contrast_t1_to_t2": vol.contrast,
        "template_planes": np.asarray(zs, dtype=np.int32)})


def write_fastmri(path: Path, kspace: np.ndarray, smaps: np.ndarray, rss_image: np.ndarray, cfg: SimConfig,
                  attrs: dict) -> None:
    """One fastMRI multi-coil file as the embedded dataset writes them: ``kspace``,
    ``reconstruction_rss``, ``sens_maps``, the ISMRMRD header, attributes ``max``, ``norm``,
    ``snr`` and ``attrs``."""
    with h5py.File(path, "w") as f:
        f.create_dataset("kspace", data=kspace, track_times=False)
        f.create_dataset("reconstruction_rss", data=rss_image, track_times=False)
        f.create_dataset("sens_maps", data=smaps, track_times=False)
        header = np.bytes_(_ismrmrd_header(cfg.size, cfg.fov_mm, cfg.n_coils))
        f.create_dataset("ismrmrd_header", data=header, track_times=False)
        f.attrs["max"] = float(rss_image.max())
        f.attrs["norm"] = float(np.linalg.norm(rss_image))
        for key, value in attrs.items():
            f.attrs[key] = value
        f.attrs["snr"] = cfg.snr
