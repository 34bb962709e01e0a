"""The naive super-resolution baseline: bicubic upsampling on the downsampler's grid.

The standard s-fold downsampler keeps high-resolution pixel ``(s i, s j)`` as low-resolution pixel
``(i, j)``, so high-resolution pixel ``p`` sits at low-resolution coordinate ``p / s``. Plain
``F.interpolate(..., mode="bicubic")`` assumes pixel centres (``(p + 0.5) / s - 0.5``) and would shift
the estimate by ``(s - 1) / 2`` pixels, costing the baseline PSNR it does not deserve; this samples
the bicubic interpolant at ``p / s`` instead (border pixels replicated). No deblurring: the
baseline ignores the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .physics import check_scale


def bicubic_upsample(y: torch.Tensor, scale: int) -> torch.Tensor:
    """``(B, C, h, w) -> (B, C, s h, s w)``, bicubic, aligned with the s-fold downsampler."""
    s = check_scale(scale)
    b, _, h, w = y.shape
    # grid_sample with align_corners=False: normalised u = (2 x + 1) / size - 1 for pixel coordinate x
    ys = (2 * (torch.arange(h * s, dtype=y.dtype, device=y.device) / s) + 1) / h - 1
    xs = (2 * (torch.arange(w * s, dtype=y.dtype, device=y.device) / s) + 1) / w - 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1).expand(b, -1, -1, -1)
    return F.grid_sample(y, grid, mode="bicubic", padding_mode="border", align_corners=False)
