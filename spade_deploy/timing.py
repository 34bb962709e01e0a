"""Timing shared by the bench, the engine selection and the hardware-aware widths: device
synchronisation and medians of interleaved rounds (every round calls each candidate once, so drift
and background load hit all of them alike)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Hashable

import torch

from .errors import SpadeError


def sync_device(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    calls: dict[Hashable, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 0,
    sync: Callable[[], None] | None = None,
    timer: Callable[[], float] = time.perf_counter,
    rotate: bool = False,
) -> dict[Hashable, float]:
    """Seconds per call of each of ``calls``: the median of ``repeats`` rounds after ``warmup``
    untimed rounds, each round calling every function once (in turn, or with ``rotate`` the order
    shifted by one each round), ``sync()`` around every call."""
    if repeats < 1:
        raise SpadeError(f"repeats must be at least 1, got {repeats}")
    sync = sync or (lambda: None)
    keys = list(calls)
    times: dict[Hashable, list[float]] = {k: [] for k in keys}
    with torch.no_grad():
        for r in range(warmup + repeats):
            k = r % len(keys) if rotate and keys else 0
            for key in keys[k:] + keys[:k]:
                sync()
                t0 = timer()
                calls[key]()
                sync()
                if r >= warmup:
                    times[key].append(timer() - t0)
    return {k: statistics.median(v) for k, v in times.items()}
