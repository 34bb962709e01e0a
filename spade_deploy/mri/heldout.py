"""A held-out MRI set from real MR images that ship in installed packages other than nilearn.

The embedded dataset (:mod:`.simulate`) is simulated from nilearn's MNI brain template; every model
of the demo is trained and fine-tuned on it. To see whether a model's speed holds on data it was
not tuned on, :func:`build_heldout_dataset` simulates the same acquisition (the same coil model,
smooth phase, noise level, fastMRI file layout and ISMRMRD header, at the embedded data's
``size x size`` matrix and field of view) from two real MR images of other people, acquired on
other scanners with other contrasts:

* ``epi``: the 4D echo-planar (BOLD) brain series nibabel ships as test data
  (``nibabel/tests/data/example4d.nii.gz``: 128 x 96 x 24 voxels of 2 x 2 x 2.2 mm, two time
  points), axial planes, one file per time point on interleaved planes;
* ``sagittal``: the sagittal T1-weighted head slice matplotlib ships as sample data
  (``matplotlib/mpl-data/sample_data/s1045.ima.gz``, 256 x 256 16-bit, the image of matplotlib's
  MRI example; 1 mm pixels assumed), with skull, face and neck, in several poses.

scikit-image's ``data.brain()`` volume is not used: scikit-image fetches it over the network (with
the optional ``pooch``), so it is not there offline. Nothing is downloaded here; the build is
deterministic in ``seed``. The files go under ``<root>/test`` (what ``spade bench --data <root>``
and ``spade eval --data <root>`` score); ``<root>/dataset.json`` records the sources.
"""

from __future__ import annotations

import importlib.metadata
import json
import importlib.resources
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np

from ..errors import SpadeError
from ..io import write_json
from ..tasks import TableReport
from . import simulate
from .simulate import SimConfig

FORMAT = "spade-deploy/heldout-dataset"
VERSION = 1
# The planes of nibabel's EPI series used (voxel z, of 24; the lowest and highest cut the brain's
# edge): one file per time point, on interleaved planes.
EPI_PLANES = ((5, 8, 11, 14, 17, 20), (6, 9, 12, 15, 18, 21))
SAGITTAL_POSES = 4


def _epi() -> tuple[np.ndarray, tuple[float, float, float]]:
    """nibabel's EPI series as (time, z, rows, cols) float32, rows anterior -> posterior; voxel
    size (row, col, z) in mm."""
    import nibabel as nib

    path = Path(str(importlib.resources.files("nibabel") / "tests" / "data" / "example4d.nii.gz"))
    if not path.is_file():
        raise SpadeError(f"nibabel's example EPI series {path} is missing from the installed nibabel")
    img = nib.load(str(path))
    vol = np.asarray(img.dataobj, dtype=np.float32)  # (x, y, z, t)
    zooms = img.header.get_zooms()
    # (x, y, z, t) -> (t, z, rows = y reversed, cols = x)
    return np.ascontiguousarray(vol[:, ::-1].transpose(3, 2, 1, 0)), (float(zooms[1]), float(zooms[0]), float(zooms[2]))


def _sagittal() -> np.ndarray:
    """matplotlib's sagittal head slice, (256, 256) float32."""
    from matplotlib import cbook

    try:
        with cbook.get_sample_data("s1045.ima.gz") as f:
            raw = f.read()
    except OSError as exc:
        raise SpadeError(f"matplotlib's sample MR image s1045.ima.gz is missing from the installed matplotlib: {exc}") \
            from None
    return np.frombuffer(raw, dtype="<u2").reshape(256, 256).astype(np.float32)


def _resample(plane: np.ndarray, pixel_mm: tuple[float, float], center: tuple[float, float], cfg: SimConfig,
              rng: np.random.Generator) -> np.ndarray:
    """``plane`` on the simulation's ``size x size`` grid of ``fov_mm``: a small random rotation
    (+-10 degrees), scale (0.92-1.08) and shift (+-8 mm) about ``center`` (rows, cols), smoothed
    before a reduction, cubic interpolation, non-negative (as :mod:`.simulate` poses its subjects)."""
    from scipy import ndimage

    n = cfg.size
    pix = cfg.fov_mm / n
    theta = math.radians(rng.uniform(-10.0, 10.0))
    scale = rng.uniform(0.92, 1.08)
    shift = rng.uniform(-8.0, 8.0, size=2)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    per_pixel = np.diag([pix / scale / pixel_mm[0], pix / scale / pixel_mm[1]])  # output -> input pixels
    matrix = per_pixel @ rot
    offset = np.asarray(center) + shift / np.asarray(pixel_mm) - matrix @ np.full(2, (n - 1) / 2)
    sigma = [0.45 * s if s > 1 else 0.0 for s in np.diag(per_pixel)]
    if any(sigma):
        plane = ndimage.gaussian_filter(plane, sigma)
    return np.clip(ndimage.affine_transform(plane, matrix, offset, output_shape=(n, n), order=3), 0, None)


def _center(plane: np.ndarray) -> tuple[float, float]:
    """The centre of the bounding box of the pixels above 10 % of the plane's maximum."""
    rows, cols = np.nonzero(plane > 0.1 * plane.max())
    return (rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2


def _acquire_file(path: Path, mags: list[np.ndarray], z_mm: list[float], cfg: SimConfig, rng: np.random.Generator,
                  attrs: dict) -> None:
    """Simulate the embedded data's acquisition of the magnitude images ``mags`` (one coil array
    per file, as :mod:`.simulate` does per subject) and write the fastMRI file."""
    coils = simulate._coil_params(cfg.n_coils, rng)
    images, smaps = [], []
    for mag, z in zip(mags, z_mm):
        images.append(mag * np.exp(1j * simulate._smooth_phase(cfg.size, rng)))
        smaps.append(simulate._coil_maps(cfg.size, z / (cfg.fov_mm / 2), coils))
    k, s, r = simulate.acquire(np.stack(images), np.stack(smaps), cfg.snr, rng)
    simulate.write_fastmri(path, k, s, r, cfg, attrs)


def build_heldout_dataset(root: str | Path, seed: int = 0, slices: int | None = None,
                          config: SimConfig | None = None) -> dict:
    """Write the held-out set under ``root/test`` (``root`` must not exist or be an empty folder,
    or a held-out set made before, which is replaced) and return its ``dataset.json``.

    ``slices``: at most this many slices per file (default: all, 6 + 6 EPI planes and
    :data:`SAGITTAL_POSES` sagittal poses). ``config``: the acquisition (default: the embedded
    data's, :class:`~.simulate.SimConfig`)."""
    cfg = config or SimConfig()
    cfg.validate()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SpadeError(f"seed must be a non-negative integer, got {seed!r}")
    if slices is not None and (isinstance(slices, bool) or not isinstance(slices, int) or slices < 1):
        raise SpadeError(f"slices must be a positive integer, got {slices!r}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise SpadeError(f"{root} is a file, expected a folder for the held-out set")
    if root.exists() and any(root.iterdir()) and _manifest(root) is None:
        raise SpadeError(f"{root} exists and is not a held-out set made by spade; choose another folder")
    t0 = time.perf_counter()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.building-", dir=root.parent))
    try:
        (tmp / "test").mkdir()
        files = {}
        epi, (row_mm, col_mm, z_mm) = _epi()
        for t, planes in enumerate(EPI_PLANES):
            planes = planes[:slices]
            rng = np.random.default_rng([seed, 1000 + t])
            mags = []
            for z in planes:
                plane = epi[t, z]
                mags.append(_resample(plane, (row_mm, col_mm), _center(epi[t].max(axis=0)), cfg, rng))
            name = f"heldout_epi_t{t}.h5"
            z_pos = [(z - (epi.shape[1] - 1) / 2) * z_mm for z in planes]
            _acquire_file(tmp / "test" / name, mags, z_pos, cfg, rng,
                          {"acquisition": "AXEPI", "patient_id": "nibabel-example4d", "source_planes":
                           np.asarray(planes, dtype=np.int32), "source_time_point": t})
            files[name] = {"source": "nibabel example4d.nii.gz", "time_point": t, "planes": list(planes)}
        head = _sagittal()
        rng = np.random.default_rng([seed, 2000])
        poses = SAGITTAL_POSES if slices is None else min(slices, SAGITTAL_POSES)
        mags = [_resample(head, (1.0, 1.0), _center(head), cfg, rng) for _ in range(poses)]
        name = "heldout_sagittal.h5"
        _acquire_file(tmp / "test" / name, mags, [0.0] * poses, cfg, rng,
                      {"acquisition": "SAGT1", "patient_id": "matplotlib-s1045"})
        files[name] = {"source": "matplotlib s1045.ima.gz", "poses": poses}
        manifest = {
            "format": FORMAT, "version": VERSION, "seed": seed, "config": asdict(cfg), "slices": slices,
            "files": files, "n_slices": sum(len(p[:slices]) for p in EPI_PLANES) + poses,
            "sources": {
                "epi": f"nibabel {importlib.metadata.version('nibabel')}: tests/data/example4d.nii.gz (4D EPI brain "
                       "series, 128x96x24 voxels of 2x2x2.2 mm, 2 time points)",
                "sagittal": f"matplotlib {importlib.metadata.version('matplotlib')}: mpl-data/sample_data/s1045.ima.gz "
                            "(sagittal T1-weighted head slice, 256x256, 1 mm pixels assumed)",
            },
            "acquisition": "as the embedded dataset (spade_deploy.mri.simulate): coil model, smooth phase, noise at "
                           "snr, fastMRI layout; each image posed at random (+-10 deg, x0.92-1.08, +-8 mm)",
            "seconds": round(time.perf_counter() - t0, 3),
        }
        write_json(tmp / "dataset.json", manifest)
        simulate._replace_dir(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def heldout_report(root: str | Path, seed: int = 0, slices: int | None = None):
    """``spade data --heldout``: build the held-out set (:func:`build_heldout_dataset`) and a table of
    its files."""
    manifest = build_heldout_dataset(root, seed=seed, slices=slices)
    rows = []
    for name, info in manifest["files"].items():
        with h5py.File(Path(root) / "test" / name, "r") as f:
            shape = f["kspace"].shape
        rows.append([name, info["source"], str(shape[0]), str(shape[1]), f"{shape[2]}x{shape[3]}"])
    return TableReport(f"Held-out set at {root}", ["file", "source", "slices", "coils", "size"], ["left"] * 5, rows,
                       [str((Path(root) / "test").resolve())])


def _manifest(root: Path) -> dict | None:
    try:
        data = json.loads((root / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


__all__ = ["build_heldout_dataset", "heldout_report", "EPI_PLANES", "SAGITTAL_POSES"]
