"""``spade reconstruct`` for super-resolution: a folder of low-resolution images -> SR PNGs.

Every PNG / JPEG / BMP directly in the source folder (RGB; greyscale converted, 16-bit refused) is
restored with the model at one ``scale`` with one blur ``kernel`` and ``noise`` level (the
degradation the images are known to have), and written as ``<out>/<name>.png`` through a
temporary file renamed into place (never into the source folder: :func:`restore_checkpoint` checks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..checkpoint import load_model
from ..deploy.cache import deployed_checkpoint
from ..device import on_model_device
from ..errors import SpadeError
from ..io import atomic_path
from ..paths import check_out_dir, check_outputs
from ..progress import Reporter
from .data import IMAGE_SUFFIXES, read_rgb
from .degradation import NETWORK_MULTIPLE
from .metrics import to_uint8
from .kernels import parse_kernels
from .physics import SRPhysics, check_kernel, check_scale


@dataclass
class RestoreResult:
    outputs: list[Path] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # the outputs' (H, W)
    scale: int = 0
    kernel: str = ""  # its name: k1 .. k12 or the file's stem


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


def restore_checkpoint(checkpoint: Path, source: Path, out: Path, scale: int, kernel: str | tuple[str, np.ndarray],
                       noise: float = 0.0,
                       backend: str = "auto", engines: Path | None = None,
                       reporter: Reporter | None = None) -> RestoreResult:
    """``spade reconstruct`` of a super-resolution checkpoint: every image of ``source`` (a folder
    or one image), degraded at ``scale`` with ``kernel`` (``k1`` .. ``k12`` or a ``.npy`` / ``.mat``
    file, or a ``(name, kernel)`` already read) and ``noise``, super-resolved into ``out`` on ``backend``
    (:func:`~spade_deploy.deploy.cache.deployed_checkpoint`). Every output is checked against the
    inputs and the data folder, and every image read once and checked, before anything is written."""
    reporter = reporter or Reporter()
    source, out = Path(source), Path(out)
    s = check_scale(scale)
    (name, k), = (parse_kernels([kernel]) if isinstance(kernel, str) else dict([kernel])).items()
    k = check_kernel(k)
    check_out_dir(out)
    paths = lr_images(source)
    folder = source if source.is_dir() else source.parent
    check_outputs(files=[out / f"{p.stem}.png" for p in paths], folders=[out], inputs=[checkpoint, source, *paths],
                  data=[folder])
    net, _ = load_model(checkpoint)
    physics = SRPhysics(k, s, noise)
    images = [read_lr(p, s, tuple(k.shape)) for p in paths]
    net = deployed_checkpoint(checkpoint, net, backend, engines, [folder], reporter, sample=(images[0], physics))
    with reporter.progress("super-resolving", transient=True) as update:
        result = restore_images(net, paths, images, physics, out, on_image=update)
    result.scale, result.kernel = s, name
    return result


@torch.no_grad()
def restore_images(model: torch.nn.Module, paths: list[Path], images: list[torch.Tensor], physics: SRPhysics,
                   out_dir: str | Path, on_image: Callable[[int, int], None] | None = None) -> RestoreResult:
    """Super-resolve ``images`` (read from ``paths`` by :func:`read_lr`) into ``out_dir`` (PNG, the
    same stems)."""
    from PIL import Image

    out = Path(out_dir)
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
