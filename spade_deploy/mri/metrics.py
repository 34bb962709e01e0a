"""Image-quality metrics exactly as fastMRI's ``fastmri/evaluate.py``.

PSNR and SSIM call scikit-image (as fastMRI does) with ``data_range = gt.max()`` of the whole
*volume*; the volume SSIM is the mean of the per-slice SSIMs. For native fastMRI data, metrics are
taken on a centre crop (:func:`center_crop`) of the size of ``reconstruction_rss``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, TypeVar

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ..errors import SpadeError

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def center_crop(x: ArrayT, shape: tuple[int, int]) -> ArrayT:
    """Centre crop over the last two dimensions (fastMRI's ``transforms.center_crop`` indices)."""
    h, w = shape
    if not (0 < h <= x.shape[-2] and 0 < w <= x.shape[-1]):
        raise SpadeError(f"cannot centre-crop an image of size {tuple(x.shape[-2:])} to {(h, w)}")
    top = (x.shape[-2] - h) // 2
    left = (x.shape[-1] - w) // 2
    return x[..., top : top + h, left : left + w]


def recon_magnitude(x: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """What ``spade reconstruct`` writes: ``|x|`` as float32, centre-cropped to ``size`` (the
    header's recon size; None keeps the full field of view). Each side is clipped to the image."""
    mag = x.abs().float() if torch.is_complex(x) else x.float()
    if size is None:
        return mag
    return center_crop(mag, (min(size[0], mag.shape[-2]), min(size[1], mag.shape[-1])))


def fastmri_crop(target: ArrayT, pred: ArrayT) -> tuple[ArrayT, ArrayT]:
    """fastMRI's ``evaluate()`` crop: both volumes centre-cropped to ``(w, w)``, ``w`` the target's
    width (each side clipped to the images, where fastMRI would fail)."""
    w = target.shape[-1]
    h = min(w, target.shape[-2], pred.shape[-2])
    return center_crop(target, (h, w)), center_crop(pred, (h, min(w, pred.shape[-1])))


def _check(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = _numpy(gt), _numpy(pred)
    if gt.shape != pred.shape:
        raise SpadeError(f"ground truth {gt.shape} and prediction {pred.shape} differ in shape")
    if np.iscomplexobj(gt) or np.iscomplexobj(pred):
        raise SpadeError("metrics take magnitude images; got complex values")
    return gt, pred


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _maxval(gt: np.ndarray, maxval: float | None) -> float:
    return gt.max() if maxval is None else maxval


def mse(gt: np.ndarray, pred: np.ndarray) -> float:
    """Mean squared error."""
    gt, pred = _check(gt, pred)
    return float(np.mean((gt - pred) ** 2))


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """``||gt - pred||^2 / ||gt||^2`` (fastMRI's NMSE)."""
    gt, pred = _check(gt, pred)
    return float(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)


def psnr(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """PSNR of a slice or volume with ``data_range = gt.max()`` unless ``maxval`` is given."""
    gt, pred = _check(gt, pred)
    return float(peak_signal_noise_ratio(gt, pred, data_range=_maxval(gt, maxval)))


def ssim(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> float:
    """SSIM of a volume ``(slices, H, W)``: mean over slices, ``data_range`` from the volume.

    A single 2-D slice is treated as a volume of one slice.
    """
    gt, pred = _check(gt, pred)
    if gt.ndim == 2:
        gt, pred = gt[None], pred[None]
    if gt.ndim != 3:
        raise SpadeError(f"SSIM needs a (slices, H, W) volume, got shape {gt.shape}")
    _ssim_window_fits(gt)
    data_range = _maxval(gt, maxval)
    total = 0.0
    for s in range(gt.shape[0]):
        total += structural_similarity(gt[s], pred[s], data_range=data_range)
    return float(total / gt.shape[0])


def _ssim_window_fits(vol: np.ndarray) -> None:
    """skimage's SSIM uses a 7 x 7 window: smaller images have no SSIM."""
    if min(vol.shape[-2:]) < 7:
        raise SpadeError(f"SSIM needs images of at least 7 x 7 pixels (its window), got {vol.shape[-2]} x {vol.shape[-1]}")


def slice_metrics(gt_vol: np.ndarray, pred_vol: np.ndarray, maxval: float | None = None) -> dict[str, list[float]]:
    """Per-slice PSNR / SSIM of a volume, each with the *volume's* ``maxval`` (default ``gt.max()``)."""
    gt_vol, pred_vol = _check(gt_vol, pred_vol)
    if gt_vol.ndim != 3:
        raise SpadeError(f"per-slice metrics need a (slices, H, W) volume, got shape {gt_vol.shape}")
    _ssim_window_fits(gt_vol)
    m = _maxval(gt_vol, maxval)
    return {
        "psnr": [psnr(g, p, m) for g, p in zip(gt_vol, pred_vol)],
        "ssim": [float(structural_similarity(g, p, data_range=m)) for g, p in zip(gt_vol, pred_vol)],
    }


@dataclass(frozen=True)
class VolumeMetrics:
    """fastMRI's metrics of one volume."""

    psnr: float
    ssim: float
    nmse: float
    n_slices: int


@dataclass(frozen=True)
class EvaluationMetrics:
    """Per-volume metrics and their means over volumes (fastMRI averages volumes, not slices)."""

    per_volume: dict[str, VolumeMetrics] = field(default_factory=dict)

    @property
    def psnr(self) -> float:
        return float(np.mean([v.psnr for v in self.per_volume.values()]))

    @property
    def ssim(self) -> float:
        return float(np.mean([v.ssim for v in self.per_volume.values()]))

    @property
    def nmse(self) -> float:
        return float(np.mean([v.nmse for v in self.per_volume.values()]))

    @property
    def n_slices(self) -> int:
        return sum(v.n_slices for v in self.per_volume.values())

    def as_dict(self) -> dict:
        return {
            "psnr": self.psnr,
            "ssim": self.ssim,
            "nmse": self.nmse,
            "n_slices": self.n_slices,
            "per_volume": {k: dataclasses.asdict(v) for k, v in self.per_volume.items()},
        }


def evaluate_volumes(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    maxvals: Mapping[str, float] | None = None,
) -> EvaluationMetrics:
    """PSNR / SSIM / NMSE per volume from ``{name: (gt, pred)}`` magnitude volumes ``(slices, H, W)``.

    As in fastMRI's ``evaluate.py``: a prediction larger than its ground truth (e.g. a 640x368
    reconstruction against a 320x320 ``reconstruction_rss``) is centre-cropped to the ground
    truth's size, and ``data_range`` is ``gt.max()`` of the volume unless ``maxvals`` gives one.
    """
    if not pairs:
        raise SpadeError("no volumes to evaluate")
    return EvaluationMetrics(per_volume={name: volume_metrics(gt, pred, None if maxvals is None else maxvals.get(name))
                                         for name, (gt, pred) in pairs.items()})


def volume_metrics(gt: np.ndarray, pred: np.ndarray, maxval: float | None = None) -> VolumeMetrics:
    """fastMRI's PSNR / SSIM / NMSE of one volume (:func:`evaluate_volumes`' per-volume scores):
    scored as soon as the volume is complete, its arrays can go."""
    gt, pred = _numpy(gt), _numpy(pred)
    if gt.ndim == 2:
        gt, pred = gt[None], pred[None]
    if pred.shape[-2:] != gt.shape[-2:]:
        pred = center_crop(pred, gt.shape[-2:])
    return VolumeMetrics(psnr=psnr(gt, pred, maxval), ssim=ssim(gt, pred, maxval), nmse=nmse(gt, pred),
                         n_slices=int(gt.shape[0]))
