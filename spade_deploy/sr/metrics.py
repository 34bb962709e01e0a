"""Super-resolution metrics as USRNet's official test computes them, per image.

* images are compared as RGB uint8: the estimate is clipped to ``[0, 1]``, scaled by 255 and
  rounded (the official ``tensor2uint``);
* a border of ``scale**2`` pixels is shaved on every side (``calculate_psnr(..., border=sf**2)``);
* PSNR: ``20 log10(255 / sqrt(MSE))``, the MSE over all pixels and the three channels, in float64;
* SSIM: Wang et al. (2004) with an 11 x 11 Gaussian window of standard deviation 1.5,
  ``K1 = 0.01``, ``K2 = 0.03``, ``L = 255``, computed per channel over the valid window positions
  and averaged over the channels: the official ``calculate_ssim``. scikit-image's
  ``structural_similarity`` with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=255`` gives the same numbers (tested against a direct implementation of the formula).

Scores are averaged per scale and kernel by the caller (:func:`mean_scores`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from skimage.metrics import structural_similarity

from ..errors import SpadeError


def to_uint8(img) -> np.ndarray:
    """``(H, W, 3)`` uint8 from a float image in ``[0, 1]``: ``(B=1, 3, H, W)`` / ``(3, H, W)``
    tensors or ``(H, W, 3)`` arrays; uint8 passes through."""
    if torch.is_tensor(img):
        t = img.detach().cpu().to(torch.float64)
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise SpadeError(f"expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        img = t.permute(1, 2, 0).numpy()
    img = np.asarray(img)
    if img.dtype == np.uint8:
        return img
    return np.uint8((np.clip(img, 0.0, 1.0) * 255.0).round())


def _pair(hr, sr, border: int) -> tuple[np.ndarray, np.ndarray]:
    hr, sr = to_uint8(hr), to_uint8(sr)
    if hr.shape != sr.shape:
        raise SpadeError(f"image shapes differ: {hr.shape} vs {sr.shape}")
    h, w = hr.shape[:2]
    if border < 0 or 2 * border >= min(h, w):
        raise SpadeError(f"border of {border} pixels leaves nothing of a {h} x {w} image")
    crop = (slice(border, h - border), slice(border, w - border))
    return hr[crop].astype(np.float64), sr[crop].astype(np.float64)


def psnr(hr, sr, border: int = 0) -> float:
    a, b = _pair(hr, sr, border)
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 20.0 * math.log10(255.0 / math.sqrt(mse))


def ssim(hr, sr, border: int = 0) -> float:
    a, b = _pair(hr, sr, border)
    if min(a.shape[:2]) < 11:
        raise SpadeError(f"SSIM needs at least 11 x 11 pixels after the border, got {a.shape[0]} x {a.shape[1]}")
    return float(structural_similarity(a, b, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, channel_axis=-1 if a.ndim == 3 else None))


def sr_scores(hr, sr, scale: int) -> dict[str, float]:
    """``{"psnr", "ssim"}`` of one image at ``scale`` (border ``scale**2``)."""
    border = int(scale) ** 2
    return {"psnr": psnr(hr, sr, border), "ssim": ssim(hr, sr, border)}


def mean_scores(scores: list[dict[str, float]]) -> dict[str, float]:
    if not scores:
        raise SpadeError("no images to average")
    return {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}


@dataclass
class SRRow:
    """The mean scores of one (scale, kernel): the model's and its bicubic baseline's, and the
    model's per image."""

    scale: int
    kernel: str
    psnr: float
    ssim: float
    psnr_bicubic: float
    ssim_bicubic: float
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
