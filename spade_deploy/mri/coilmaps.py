"""Coil maps estimated from the acquisition only: ESPIRiT (sigpy) on the fully sampled centre.

A scanner gives the measured columns of k-space, nothing else. The maps of every reconstruction
are therefore calibrated on the auto-calibration (ACS) block of the mask actually used: the
contiguous run of sampled columns at the centre of k-space, with the k-space outside it set to
zero and the calibration width equal to the ACS width (so narrow ACS blocks, e.g. 10 lines at
width 128, calibrate on those 10 lines, with a kernel that fits them).

ESPIRiT maps are unit-norm inside the object's support and zero outside (sigpy's crop 0.95), so
``sum_c |S_c|^2 <= 1`` everywhere (the operator norm of ``A`` is at most one, which the DEQ's
contraction relies on); :func:`espirit_from_acs` enforces it against round-off. Measured with
the shipped small DEQ on two simulated 160 x 160 test slices at acceleration 6 (fastMRI's scores
against reconstruction_rss): these maps 31.10 dB / SSIM 0.601, 18 iterations; uncropped maps (unit
norm over the whole field of view, ``crop = 0``) 30.83 dB / 0.500, 19 iterations; the
simulation's true maps 30.77 dB / 0.493, 18 iterations. An untrained tiny DEQ, whose prior outside
the object is not contractive, ends further from a fixed point with cropped maps (residual 2.5e-2
at the 100-iteration cap, against 5.8e-3 uncropped): train with the maps you evaluate with.

Maps are cached on disk under a cache directory (``--cache-dir``; default
``$XDG_CACHE_HOME/spade-deploy`` or ``~/.cache/spade-deploy``, never beside the data), keyed by a
hash of the calibration data and the ESPIRiT settings. Retrospective fastMRI equispaced masks
share their centre block whatever the random offset, so every epoch reuses the maps of the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SpadeError
from ..io import atomic_path
from ..lazy import optional
from ..paths import default_cache_dir

MIN_ACS = 4  # fewer centre lines cannot hold an ESPIRiT kernel of useful size


@dataclass(frozen=True)
class EspiritParams:
    """ESPIRiT settings (sigpy ``EspiritCalib``); part of the cache key. The calibration width
    is not a setting: it is the ACS width of the mask used. The kernel width shrinks to fit a
    narrow ACS block (at most half the calibration width: at 6 ACS lines a 4-wide kernel leaves
    the maps empty over most of the brain, a 3-wide one matches the true maps to 0.1 %)."""

    thresh: float = 0.02
    kernel_width: int = 6
    crop: float = 0.95
    # power iterations per pixel: at 160 x 160 with 8 coils and 13 ACS lines, 30 give the maps of
    # sigpy's default 100 to 1e-7 in 1.0 s instead of 1.6 s per slice (2-core CPU, shared)
    max_iter: int = 30


def centre_block(width: int, center_fraction: float) -> tuple[int, int]:
    """Columns ``[start, stop)`` of fastMRI's equispaced-mask centre block (its ACS lines): it
    depends only on the width and the centre fraction, not on the mask's random offset."""
    n = round(width * center_fraction)
    start = (width - n + 1) // 2
    return start, start + n


def acs_run(mask: np.ndarray) -> tuple[int, int]:
    """Columns ``[start, stop)`` of the contiguous run of sampled columns through the centre
    column ``W // 2`` of a 1-D column mask (an acquired mask's ACS block)."""
    m = np.asarray(mask).reshape(-1) > 0
    c = m.size // 2
    if not m[c]:
        raise SpadeError("the mask does not sample the centre column of k-space: no auto-calibration (ACS) block "
                         "to estimate coil maps from")
    start, stop = c, c + 1
    while start > 0 and m[start - 1]:
        start -= 1
    while stop < m.size and m[stop]:
        stop += 1
    return start, stop


def calibration_width(shape: tuple[int, int], acs: tuple[int, int]) -> int:
    """The widest square calibration region sigpy crops (centred at ``(H // 2, W // 2)``) whose
    columns all lie inside the ACS block ``acs``."""
    h, w = shape
    start, stop = acs
    best = 0
    for cw in range(1, min(stop - start, h) + 1):
        lo = w // 2 - cw // 2
        if lo >= start and lo + cw <= stop:
            best = cw
    return best


def espirit_from_acs(y: np.ndarray, acs: tuple[int, int], params: EspiritParams = EspiritParams()) -> np.ndarray:
    """ESPIRiT maps ``(C, H, W)`` of measured k-space ``y`` from its ACS columns ``acs`` only."""
    calib, kernel = _calibration(y, acs, params)
    zeroed = np.zeros_like(y)
    zeroed[..., acs[0] : acs[1]] = y[..., acs[0] : acs[1]]
    maps = optional("sigpy.mri.app").EspiritCalib(  # imported on first use: sigpy takes seconds to import
        zeroed, calib_width=calib, thresh=params.thresh, kernel_width=kernel, crop=params.crop,
        max_iter=params.max_iter, show_pbar=False,
    ).run()
    maps = np.asarray(maps, dtype=np.complex64)
    norm = np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    return (maps / np.maximum(norm, 1.0)).astype(np.complex64)


def _calibration(y: np.ndarray, acs: tuple[int, int], params: EspiritParams) -> tuple[int, int]:
    if y.ndim != 3 or not np.iscomplexobj(y):
        raise SpadeError(f"coil-map calibration needs complex (C, H, W) k-space, got {y.shape} {y.dtype}")
    calib = calibration_width(y.shape[-2:], acs)
    if calib < MIN_ACS:
        raise SpadeError(
            f"the mask's fully sampled centre has {acs[1] - acs[0]} columns (usable calibration width {calib}); "
            f"coil maps need at least {MIN_ACS}: use a larger --center-fraction"
        )
    return calib, max(2, min(params.kernel_width, calib // 2))


class CoilMapEstimator:
    """ESPIRiT maps from the ACS block, cached on disk (``cache_dir/espirit``) and in memory."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, params: EspiritParams = EspiritParams(),
                 memory_bytes: int = 256 * 2**20):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.params = params
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_bytes = memory_bytes  # the in-memory copy's bound (the demo's 100 slices: 164 MB)
        self.computed = 0  # ESPIRiT runs (cache misses), for tests and reports

    def key(self, y: np.ndarray, acs: tuple[int, int]) -> str:
        """Hash of what the maps depend on: the calibration region, the image shape, the settings."""
        calib, kernel = _calibration(y, acs, self.params)
        h, w = y.shape[-2:]
        top, left = h // 2 - calib // 2, w // 2 - calib // 2
        region = y[:, top : top + calib, left : left + calib]
        digest = hashlib.sha256(np.ascontiguousarray(region, dtype=np.complex64).tobytes())
        digest.update(json.dumps({"shape": list(y.shape), "calib": calib, "kernel": kernel,
                                  **dataclasses.asdict(self.params)}, sort_keys=True).encode())
        return digest.hexdigest()[:32]

    def __call__(self, y: np.ndarray, acs: tuple[int, int]) -> np.ndarray:
        key = self.key(y, acs)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self.cache_dir / "espirit" / f"{key}.npy"
        maps = self._load(path, y.shape)
        if maps is None:
            maps = espirit_from_acs(y, acs, self.params)
            self.computed += 1
            self._store(path, maps)
        self._memory[key] = maps
        while len(self._memory) > 1 and sum(m.nbytes for m in self._memory.values()) > self._memory_bytes:
            self._memory.popitem(last=False)
        return maps

    @staticmethod
    def _load(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            maps = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # unreadable entry: recompute and overwrite
        if maps.shape != tuple(shape) or maps.dtype != np.complex64 or not np.isfinite(maps).all():
            return None
        return maps

    @staticmethod
    def _store(path: Path, maps: np.ndarray) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, maps, allow_pickle=False)
        except (OSError, SpadeError):
            pass  # a read-only cache only costs recomputation
