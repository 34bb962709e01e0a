"""``spade reconstruct`` for super-resolution: a folder of low-resolution images -> SR PNGs.

Every PNG / JPEG / BMP directly in the source folder (RGB; greyscale converted, 16-bit refused) is
restored with the model at one ``scale`` with one blur ``kernel`` and ``noise`` level (the
degradation the images are known to have), and written as ``<out>/<name>.png`` through a
temporary file renamed into place (never into the source folder: :func:`restore_checkpoint` checks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..archive import RECORD_KEY, Shard, after_output, output_record, shard_indices, up_to_date
from ..checkpoint import load_model
from ..deploy.cache import deployed_checkpoint
from ..device import on_model_device
from ..errors import SpadeError
from ..io import atomic_path, read_manifest
from ..paths import check_out_dir, check_outputs, sha256_file
from ..progress import Reporter
from .data import IMAGE_SUFFIXES, read_rgb
from .degradation import NETWORK_MULTIPLE
from .metrics import to_uint8
from .kernels import parse_kernels
from .physics import SRPhysics, check_kernel, check_scale


@dataclass
class RestoreResult:
    outputs: list[Path] = field(default_factory=list)  # written (and, with skip_existing, found up to date)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # the written outputs' (H, W)
    scale: int = 0
    kernel: str = ""  # its name: k1 .. k12 or the file's stem
    skipped: list[Path] = field(default_factory=list)  # found up to date, not redone
    shard: Shard = Shard()
    n_files: int = 0  # the inputs of every shard


def read_record(path: Path) -> dict | None:
    """The record (:func:`~spade_deploy.archive.output_record`) an SR PNG keeps in its text chunk."""
    from PIL import Image

    with Image.open(path) as img:
        raw = getattr(img, "text", {}).get(RECORD_KEY)
    return None if raw is None else json.loads(raw)


def image_pixels(path: Path) -> int:
    """An image's pixel count from its header (the weight that balances shards)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.size[0] * img.size[1]
    except OSError:
        return 1  # unreadable: read_lr names the fault when its shard reads it


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
                       reporter: Reporter | None = None, shard: Shard = Shard(),
                       skip_existing: bool = False) -> RestoreResult:
    """``spade reconstruct`` of a super-resolution checkpoint: every image of ``source`` (a folder
    or one image), degraded at ``scale`` with ``kernel`` (``k1`` .. ``k12`` or a ``.npy`` / ``.mat``
    file, or a ``(name, kernel)`` already read) and ``noise``, super-resolved into ``out`` on ``backend``
    (:func:`~spade_deploy.deploy.cache.deployed_checkpoint`). Every output is checked against the
    inputs and the data folder, and every image read once and checked, before anything is written.
    ``shard``: only this shard's images (balanced by pixels); every PNG records the checkpoint and
    the degradation that made it, and ``skip_existing`` skips one recording exactly what this run
    would (:mod:`spade_deploy.archive`)."""
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
    settings = {"model": read_manifest(checkpoint).get("model"), "scale": s, "kernel": name,
                "kernel_sha256": hashlib.sha256(np.ascontiguousarray(k, dtype=np.float64).tobytes()).hexdigest(),
                "noise": float(noise)}
    digest = sha256_file(checkpoint)
    result = RestoreResult(scale=s, kernel=name, shard=shard, n_files=len(paths))
    todo = []
    for i in shard_indices([image_pixels(p) for p in paths], shard):
        target = out / f"{paths[i].stem}.png"
        record = output_record(digest, settings, paths[i])
        if skip_existing and up_to_date(target, record, read_record):
            result.skipped.append(target)
            result.outputs.append(target)
        else:
            todo.append((paths[i], record))
    if not todo:
        return result
    net, _ = load_model(checkpoint)
    physics = SRPhysics(k, s, noise)
    images = [read_lr(p, s, tuple(k.shape)) for p, _ in todo]
    net = deployed_checkpoint(checkpoint, net, backend, engines, [folder], reporter, sample=(images[0], physics))
    with reporter.progress("super-resolving", transient=True) as update:
        done = restore_images(net, [p for p, _ in todo], images, physics, out, on_image=update,
                              records=[r for _, r in todo])
    result.outputs += done.outputs
    result.sizes = done.sizes
    return result


@torch.no_grad()
def restore_images(model: torch.nn.Module, paths: list[Path], images: list[torch.Tensor], physics: SRPhysics,
                   out_dir: str | Path, on_image: Callable[[int, int], None] | None = None,
                   records: list[dict] | None = None) -> RestoreResult:
    """Super-resolve ``images`` (read from ``paths`` by :func:`read_lr`) into ``out_dir`` (PNG, the
    same stems; ``records``: each one's record, kept in a text chunk)."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    out = Path(out_dir)
    model.eval()
    result = RestoreResult()
    out.mkdir(parents=True, exist_ok=True)
    for i, (path, y) in enumerate(zip(paths, images)):
        x = model(*on_model_device((y, physics), model)).cpu()
        sr = to_uint8(x)
        target = out / f"{path.stem}.png"
        info = None
        if records is not None:
            info = PngInfo()
            info.add_text(RECORD_KEY, json.dumps(records[i], sort_keys=True))
        with atomic_path(target) as tmp:
            Image.fromarray(sr).save(tmp, format="PNG", pnginfo=info)
        result.outputs.append(target)
        result.sizes.append(sr.shape[:2])
        after_output(len(result.outputs))
        if on_image:
            on_image(i + 1, len(paths))
    return result
