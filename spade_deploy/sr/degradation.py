"""The classical degradation of USRNet's official test (``main_test_table1.py``) and training data.

For a high-resolution uint8 RGB image ``x``, scale ``s`` and kernel ``k``:

1. crop ``x`` to a multiple of ``lcm(s, 8)`` (top-left kept): the network's multiple at every scale;
2. blur with wrap-around boundaries, ``scipy.ndimage.convolve(x, k[..., None], mode="wrap")`` on the
   uint8 image, whose result is uint8 again (scipy truncates towards zero);
3. keep pixel ``(0, 0)`` of every ``s x s`` block (the standard s-fold downsampler);
4. scale to ``[0, 1]`` and add white Gaussian noise of standard deviation ``noise`` (on that scale;
   0 by default, as in the paper's tables), drawn with ``numpy.random.seed(seed)``.

:func:`degrade` is that recipe to the letter (scipy, the evaluation sets); :func:`degrade_tensor`
is the same degradation on torch batches through :class:`SRPhysics` (training), equal to it up to
the truncation of values within float round-off of an integer (tested).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from ..errors import SpadeError
from .physics import SRPhysics, check_kernel, check_scale, downsample

NETWORK_MULTIPLE = 8  # the ResUNet's three stride-2 levels


def crop_multiple(scale: int) -> int:
    """The official modcrop multiple: ``lcm(scale, 8)``."""
    return math.lcm(check_scale(scale), NETWORK_MULTIPLE)


def modcrop(img: np.ndarray, multiple: int) -> np.ndarray:
    """Crop ``(H, W, ...)`` to the largest multiple of ``multiple`` (top-left kept)."""
    h, w = img.shape[:2]
    if h < multiple or w < multiple:
        raise SpadeError(f"image of {h} x {w} is smaller than the {multiple} x {multiple} the network needs")
    return img[: h - h % multiple, : w - w % multiple]


def _check_hr(hr: np.ndarray) -> np.ndarray:
    if not isinstance(hr, np.ndarray) or hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        raise SpadeError(f"expected an (H, W, 3) uint8 RGB image, got {getattr(hr, 'shape', None)} {getattr(hr, 'dtype', type(hr))}")
    return hr


def degrade(hr: np.ndarray, kernel, scale: int, noise: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(hr_cropped uint8 (H, W, 3), lr float32 (H/s, W/s, 3))`` by the official recipe (module doc)."""
    scale = check_scale(scale)
    if not (noise >= 0 and math.isfinite(noise)):
        raise SpadeError(f"noise level must be a non-negative number, got {noise}")
    hr = modcrop(_check_hr(hr), crop_multiple(scale))
    k = check_kernel(kernel, hr.shape[:2]).numpy()
    blurred = ndimage.convolve(hr, k[..., np.newaxis], mode="wrap")  # uint8 in, uint8 out
    lr = blurred[::scale, ::scale].astype(np.float32) / 255.0
    if noise > 0:
        np.random.seed(seed)
        lr = lr + np.random.normal(0, noise, lr.shape).astype(np.float32)
    return hr, lr


def degrade_tensor(hr: torch.Tensor, physics: SRPhysics, noise: float = 0.0, quantize: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Low-resolution ``(B, 3, H/s, W/s)`` from high-resolution ``(B, 3, H, W)`` in ``[0, 1]`` (values
    on the uint8 grid): blur and downsample with ``physics``, truncate to the uint8 grid like the
    official recipe (``quantize``), add noise of standard deviation ``noise``."""
    lr = physics.A(hr)
    if quantize:
        lr = torch.floor(lr * 255.0).clamp(0, 255) / 255.0
    if noise > 0:
        lr = lr + noise * torch.randn(lr.shape, generator=generator, dtype=lr.dtype).to(lr.device)
    return lr


__all__ = ["crop_multiple", "modcrop", "degrade", "degrade_tensor", "downsample"]
