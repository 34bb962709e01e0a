"""USRNet's official test loop: every image degraded at every scale with every kernel, scored per
image (:mod:`.metrics`) and averaged per scale and kernel, as ``main_test_table1.py`` reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from ..errors import SpadeError
from .baseline import bicubic_upsample
from .data import SRImage
from .degradation import degrade
from .kernels import kernel_names, paper_kernels
from .metrics import SRRow, mean_scores, sr_scores
from .physics import SRPhysics, check_scale

Restorer = Callable[[torch.Tensor, SRPhysics], torch.Tensor]  # (y (1, 3, h, w), physics) -> x (1, 3, H, W)


@dataclass
class SRCase:
    image: str
    scale: int
    kernel: str
    hr: np.ndarray  # (H, W, 3) uint8, cropped to lcm(scale, 8)
    lr: np.ndarray  # (H / s, W / s, 3) float32
    physics: SRPhysics

    @property
    def y(self) -> torch.Tensor:
        return torch.from_numpy(self.lr).permute(2, 0, 1)[None]


def degraded_cases(images: Iterable[SRImage], scales: Iterable[int] = (2, 3, 4),
                   kernels: dict[str, np.ndarray] | None = None, noise: float = 0.0) -> list[SRCase]:
    """Every (scale, kernel, image), degraded by the official recipe; ``kernels`` (name -> kernel)
    default to the 12 of the papers, ``k1`` .. ``k12``."""
    kernels = dict(zip(kernel_names(), paper_kernels())) if kernels is None else dict(kernels)
    images = list(images)
    if not images:
        raise SpadeError("no images to evaluate")
    cases = []
    for scale in scales:
        scale = check_scale(scale)
        for name, k in kernels.items():
            physics = SRPhysics(k, scale, noise)
            for im in images:
                hr, lr = degrade(im.image, k, scale, noise)
                cases.append(SRCase(im.name, scale, name, hr, lr, physics))
    return cases


def model_restorer(model: torch.nn.Module) -> Restorer:
    def restore(y: torch.Tensor, physics: SRPhysics) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(y, physics)

    return restore


def bicubic_restorer(y: torch.Tensor, physics: SRPhysics) -> torch.Tensor:
    return bicubic_upsample(y, physics.scale)


def evaluate_cases(restore: Restorer, cases: list[SRCase]) -> list[SRRow]:
    """Mean PSNR / SSIM per (scale, kernel) of ``restore`` and of bicubic upsampling, in the order
    the cases come."""
    groups: dict[tuple[int, str], dict[str, dict[str, float]]] = {}
    bicubic: dict[tuple[int, str], list[dict[str, float]]] = {}
    for case in cases:
        x = restore(case.y, case.physics)
        groups.setdefault((case.scale, case.kernel), {})[case.image] = sr_scores(case.hr, x, case.scale)
        base = bicubic_restorer(case.y, case.physics)
        bicubic.setdefault((case.scale, case.kernel), []).append(sr_scores(case.hr, base, case.scale))
    rows = []
    for (scale, kernel), per_image in groups.items():
        mean, base = mean_scores(list(per_image.values())), mean_scores(bicubic[(scale, kernel)])
        rows.append(SRRow(scale, kernel, mean["psnr"], mean["ssim"], base["psnr"], base["ssim"], per_image))
    return rows
