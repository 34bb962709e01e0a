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
The disk cache holds at most a budget (``$SPADE_MAPS_CACHE_SIZE``, e.g. ``200G``; default
:data:`DEFAULT_BUDGET`; ``spade maps --cache-size``): after each store the least recently used
entries (each read marks its entry used, in its modification time: access times are not kept on
most mounts) are removed until the cache fits. Entries are written through a temporary file and
renamed, so processes sharing the cache (the ranks of a torchrun job, loader workers) never read
a partial entry; one that vanishes under a reader is recomputed. A fastMRI brain slice (16 coils,
640 x 320) takes 26 MB; :func:`build_maps` (``spade maps``) fills the cache for a folder ahead of a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SpadeError
from ..io import atomic_path
from ..lazy import optional
from ..paths import default_cache_dir

MIN_ACS = 4  # fewer centre lines cannot hold an ESPIRiT kernel of useful size
BUDGET_ENV = "SPADE_MAPS_CACHE_SIZE"
DEFAULT_BUDGET = 20 * 2**30  # about 800 fastMRI brain slices
STALE_TEMP_SECONDS = 3600  # a cache entry's temporary file older than this was left by a killed writer


def parse_size(text: str | int | None, what: str = BUDGET_ENV) -> int | None:
    """Bytes from ``123``, ``500M``, ``20G``, ``1.5T`` (powers of 1024); None for None or empty."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
        if match is None:
            raise SpadeError(f"{what} {text!r} is not a size (e.g. 500M, 20G, 1.5T)")
        value = int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))
    if value < 0:
        raise SpadeError(f"{what} {text!r} is not a size (e.g. 500M, 20G, 1.5T)")
    return value


def cache_budget(budget: int | str | None = None) -> int:
    """The disk cache's budget in bytes: ``budget``, else ``$SPADE_MAPS_CACHE_SIZE``, else the default."""
    for value, what in ((budget, "--cache-size"), (os.environ.get(BUDGET_ENV), BUDGET_ENV)):
        size = parse_size(value, what)
        if size is not None:
            return size
    return DEFAULT_BUDGET


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
    """ESPIRiT maps from the ACS block, cached on disk (``cache_dir/espirit``, within ``budget``
    bytes: :func:`cache_budget`) and in memory (``memory_bytes``). Picklable without its memory
    copy, so loader workers can take it."""

    def __init__(self, cache_dir: str | os.PathLike | None = None, params: EspiritParams = EspiritParams(),
                 memory_bytes: int = 256 * 2**20, budget: int | str | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.params = params
        self.budget = cache_budget(budget)
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._memory_bytes = memory_bytes  # the in-memory copy's bound (the demo's 100 slices: 164 MB)
        self.computed = 0  # ESPIRiT runs (cache misses), for tests and reports

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_memory"] = OrderedDict()  # a copy sent to another process starts without the memory cache
        return state

    @property
    def folder(self) -> Path:
        return self.cache_dir / "espirit"

    def key(self, y: np.ndarray, acs: tuple[int, int]) -> str:
        """Hash of what the maps depend on: the calibration region, the image shape, the settings
        (signed zeros made plain: a masked and an unmasked copy of the same k-space share a key)."""
        calib, kernel = _calibration(y, acs, self.params)
        h, w = y.shape[-2:]
        top, left = h // 2 - calib // 2, w // 2 - calib // 2
        region = np.ascontiguousarray(y[:, top : top + calib, left : left + calib], dtype=np.complex64) + np.complex64(0)
        digest = hashlib.sha256(region.tobytes())
        digest.update(json.dumps({"shape": list(y.shape), "calib": calib, "kernel": kernel,
                                  **dataclasses.asdict(self.params)}, sort_keys=True).encode())
        return digest.hexdigest()[:32]

    def __call__(self, y: np.ndarray, acs: tuple[int, int]) -> np.ndarray:
        return self.maps(y, acs, self.key(y, acs))

    def maps(self, y: np.ndarray, acs: tuple[int, int], key: str) -> np.ndarray:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self.folder / f"{key}.npy"
        maps = self._load(path, y.shape)
        if maps is None:
            maps = espirit_from_acs(y, acs, self.params)
            self.computed += 1
            self._store(path, maps)
        self._memory[key] = maps
        while len(self._memory) > 1 and sum(m.nbytes for m in self._memory.values()) > self._memory_bytes:
            self._memory.popitem(last=False)
        return maps

    def precomputed(self, kspace: np.ndarray, blocks: list[tuple[int, int]]) -> "PrecomputedMaps":
        """The maps of a batch's slices ``kspace`` (B, C, H, W; measured or fully sampled: only
        the ACS columns ``blocks[b]`` are read) made now, e.g. in a loader worker; the batch's
        measurement then takes them instead of estimating again."""
        found = {}
        for y, acs in zip(kspace, blocks):
            key = self.key(y, acs)
            found[key] = self.maps(y, acs, key)
        return PrecomputedMaps(self, found)

    @staticmethod
    def _load(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            maps = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # unreadable entry (or removed by another process meanwhile): recompute and overwrite
        if maps.shape != tuple(shape) or maps.dtype != np.complex64 or not np.isfinite(maps).all():
            return None
        try:
            os.utime(path)  # used now: what the eviction orders by
        except OSError:
            pass
        return maps

    def _store(self, path: Path, maps: np.ndarray) -> None:
        if maps.nbytes > self.budget:
            return  # larger than the whole cache: kept in memory only
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, maps, allow_pickle=False)
        except (OSError, SpadeError):
            return  # a read-only or full cache only costs recomputation
        evict(path.parent, self.budget, keep=path)


@dataclass
class PrecomputedMaps:
    """A batch's maps made ahead (:meth:`CoilMapEstimator.precomputed`), looked up by key; any
    other measurement is estimated by ``estimator``. Called as the estimator is."""

    estimator: CoilMapEstimator
    found: dict[str, np.ndarray] = field(default_factory=dict)

    def __call__(self, y: np.ndarray, acs: tuple[int, int]) -> np.ndarray:
        key = self.estimator.key(y, acs)
        if key in self.found:
            return self.found[key]
        return self.estimator.maps(y, acs, key)

    @property
    def params(self) -> EspiritParams:
        return self.estimator.params

    @property
    def cache_dir(self) -> Path:
        return self.estimator.cache_dir


@dataclass(frozen=True)
class CacheUsage:
    entries: int
    bytes: int
    removed: int = 0  # entries evicted by this call


def cache_usage(folder: Path) -> CacheUsage:
    entries = _entries(Path(folder))
    return CacheUsage(len(entries), sum(size for _, size, _ in entries))


def _entries(folder: Path) -> list[tuple[Path, int, float]]:
    """``(path, bytes, last use)`` of every complete entry, stale temporaries removed on the way."""
    out, now = [], time.time()
    try:
        listing = list(os.scandir(folder))
    except OSError:
        return out
    for entry in listing:
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # removed meanwhile
        if entry.name.startswith("."):
            if entry.name.endswith(".tmp") and now - st.st_mtime > STALE_TEMP_SECONDS:
                Path(entry.path).unlink(missing_ok=True)
            continue
        if entry.name.endswith(".npy") and entry.is_file(follow_symlinks=False):
            out.append((Path(entry.path), st.st_size, st.st_mtime))
    return out


def evict(folder: Path, budget: int, keep: Path | None = None) -> CacheUsage:
    """Remove the least recently used entries of ``folder`` until it holds at most ``budget``
    bytes (``keep``, the entry just written, stays)."""
    entries = sorted(_entries(Path(folder)), key=lambda e: (e[2], e[0].name))
    total, removed = sum(size for _, size, _ in entries), 0
    for path, size, _ in entries:
        if total <= budget:
            break
        if keep is not None and path == keep:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass  # another process evicted it
        except OSError:
            continue
        total -= size
        removed += 1
    return CacheUsage(len(entries) - removed, total, removed)


def acs_block(mask, width: int, center_fraction: float) -> tuple[int, int]:
    """The ACS columns maps are estimated from: an acquired mask's centre run, else the centre
    block of fastMRI's equispaced mask at ``center_fraction``."""
    return acs_run(np.asarray(mask)) if mask is not None else centre_block(width, center_fraction)
