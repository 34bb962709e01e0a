"""``spade reconstruct`` for super-resolution: a folder of low-resolution images -> SR PNGs.

Every PNG / JPEG / BMP directly in the source folder (RGB; greyscale converted, 16-bit refused) is
restored with the model at one ``scale`` with one blur ``kernel`` and ``noise`` level (the
degradation the images are known to have), and written as ``<out>/<name>.png`` through a
temporary file renamed into place (never into the source folder: the caller checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..device import on_model_device
from ..errors import SpadeError
from ..io import atomic_path
from .data import IMAGE_SUFFIXES, read_rgb
from .degradation import NETWORK_MULTIPLE
from .metrics import to_uint8
from .physics import SRPhysics, check_kernel


@dataclass
class RestoreResult:
    outputs: list[Path] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # the outputs' (H, W)


def lr_images(source: str | Path) -> list[Path]:
    """The images directly in ``source`` (a folder) or ``source`` itself (one image), by name."""
    source = Path(source)
    if source.is_file():
        paths = [source]
    elif source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise SpadeError(f"image source {source} not found")
    if not paths or any(p.suffix.lower() not in IMAGE_SUFFIXES for p in paths):
        raise SpadeError(f"no PNG / JPEG / BMP images in {source}")
    stems = [p.stem for p in paths]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise SpadeError(f"images {', '.join(clash)} exist in several formats in {source}; their SR PNGs would clash")
    return paths


def read_lr(path: Path, scale: int, kernel_shape: tuple[int, int]) -> torch.Tensor:
    """An LR image as ``(1, 3, h, w)`` in [0, 1]; its SR size ``s h x s w`` must hold the kernel
    and the network's multiple."""
    img = read_rgb(path)
    h, w = img.shape[:2]
    if min(h, w) * scale < NETWORK_MULTIPLE:
        raise SpadeError(f"image {path.name} is {h} x {w}: at x{scale} smaller than the {NETWORK_MULTIPLE} x "
                         f"{NETWORK_MULTIPLE} the network needs")
    if kernel_shape[0] > h * scale or kernel_shape[1] > w * scale:
        raise SpadeError(f"blur kernel of {kernel_shape[0]} x {kernel_shape[1]} is larger than the "
                         f"{h * scale} x {w * scale} SR image of {path.name}")
    return torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


@torch.no_grad()
def restore_folder(model: torch.nn.Module, source: str | Path, out_dir: str | Path, scale: int, kernel,
                   noise: float = 0.0, on_image: Callable[[int, int], None] | None = None) -> RestoreResult:
    """Super-resolve every image of ``source`` into ``out_dir`` (PNG, same stem)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpadeError(f"output path {out} is a file, expected a folder")
    k = check_kernel(kernel)
    physics = SRPhysics(k, scale, noise)
    paths = lr_images(source)
    images = [read_lr(p, physics.scale, tuple(k.shape)) for p in paths]  # every input checked before writing
    from PIL import Image

    model.eval()
    result = RestoreResult()
    out.mkdir(parents=True, exist_ok=True)
    for i, (path, y) in enumerate(zip(paths, images)):
        x = model(*on_model_device((y, physics), model)).cpu()
        sr = to_uint8(x)
        target = out / f"{path.stem}.png"
        with atomic_path(target) as tmp:
            Image.fromarray(sr).save(tmp, format="PNG")
        result.outputs.append(target)
        result.sizes.append(sr.shape[:2])
        if on_image:
            on_image(i + 1, len(paths))
    return result
