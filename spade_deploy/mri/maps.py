"""``spade maps``: a folder's ESPIRiT coil maps estimated ahead of a run into the budgeted cache
(:mod:`.coilmaps`), one shard of the files per process (:mod:`spade_deploy.archive`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..archive import Shard, shard_indices
from ..paths import check_outputs
from ..progress import Reporter
from . import reader
from .coilmaps import CacheUsage, CoilMapEstimator, EspiritParams, acs_block, cache_usage


@dataclass
class MapsResult:
    files: int  # this shard's
    slices: int
    computed: int  # ESPIRiT runs (the rest were cached already)
    usage: CacheUsage
    budget: int


def build_maps(data: str | os.PathLike, center_fraction: float, cache_dir: str | os.PathLike | None = None,
               budget: int | str | None = None, shard=None, params: EspiritParams = EspiritParams(),
               reporter=None) -> MapsResult:
    """``spade maps``: the ESPIRiT maps of every slice of ``data`` (an .h5 file or a folder of
    them) for the measurements at ``center_fraction`` (files with an acquisition mask: their own
    ACS block) estimated into the cache, this ``shard``'s files only (balanced by slices, see
    :mod:`spade_deploy.archive`). Nothing is written beside the data; ``reporter`` shows the progress."""
    shard = shard or Shard()
    estimator = CoilMapEstimator(cache_dir, params, memory_bytes=0, budget=budget)
    ds = reader.SliceDataset(data, coil_maps="espirit", cache_dir=estimator.cache_dir)
    check_outputs(folders=[estimator.folder], data=[ds.root if ds.root.is_dir() else ds.root.parent],
                  option="--cache-dir")
    files = [reader.SliceDataset(p, coil_maps="espirit", cache_dir=estimator.cache_dir) for p in ds.files]
    mine = shard_indices([len(f) for f in files], shard)
    total, done = sum(len(files[i]) for i in mine), 0
    with (reporter or Reporter()).progress("estimating coil maps") as update:
        for i in mine:
            for s in range(len(files[i])):
                item = files[i][s]
                k = item["kspace"].numpy()
                mask = item["mask"].numpy() if item["mask"] is not None else None
                estimator(k, acs_block(mask, k.shape[-1], center_fraction))
                done += 1
                update(done, total)
    return MapsResult(len(mine), done, estimator.computed, cache_usage(estimator.folder), estimator.budget)
