"""Images for super-resolution: an embedded set of real photographs, or a user's folder.

The embedded set needs no download: colour photographs that ship inside packages spade-deploy
installs (scikit-image's sample images; matplotlib's sample data; scikit-learn's sample images,
installed with nilearn), split once and for all (no randomness):

========  ======================================================================
train     rocket, motorcycle (left view), Grace Hopper, China (Summer Palace), flower;
          greyscale: camera (the cameraman), coins, brick, grass, gravel
val       chelsea (the cat)
test      astronaut (Eileen Collins), coffee
========  ======================================================================

The greyscale photographs train as RGB images with three equal channels (as the official
``imread_uint(path, 3)`` reads them); they add edges and textures to five colour photographs, on
which alone (with each tile's error relative to its own norm) a base lost to bicubic upsampling
with the narrowest kernel at x4 (``benchmarks/README.md``). Validation and test stay colour
photographs. scikit-image's other
samples are left out on purpose: synthetic (colorwheel, logo, chessboard), low-contrast (moon),
non-photographic or far from natural scenes (Hubble deep field, retina, immunohistochemistry,
text, page), ``cat`` (the same file as chelsea) and the right view of the motorcycle (a near
duplicate of the left one).

A user's folder: the PNG / JPEG / BMP files directly in it, sorted by name. Greyscale and palette
images are converted to RGB (as the official ``imread_uint(path, 3)`` does), an alpha channel is
dropped; 16-bit images are refused (their values would be silently truncated to 8 bits), as are
images smaller than the network's multiple.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import SpadeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
SPLITS = ("train", "val", "test")

# name -> (package, path inside the package, split)
EMBEDDED: dict[str, tuple[str, str, str]] = {
    "rocket": ("skimage", "data/rocket.jpg", "train"),
    "motorcycle": ("skimage", "data/motorcycle_left.png", "train"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "train"),
    "china": ("sklearn", "datasets/images/china.jpg", "train"),
    "flower": ("sklearn", "datasets/images/flower.jpg", "train"),
    "camera": ("skimage", "data/camera.png", "train"),
    "coins": ("skimage", "data/coins.png", "train"),
    "brick": ("skimage", "data/brick.png", "train"),
    "grass": ("skimage", "data/grass.png", "train"),
    "gravel": ("skimage", "data/gravel.png", "train"),
    "chelsea": ("skimage", "data/chelsea.png", "val"),
    "astronaut": ("skimage", "data/astronaut.png", "test"),
    "coffee": ("skimage", "data/coffee.png", "test"),
}


@dataclass
class SRImage:
    name: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    source: str


def _package_file(package: str, inner: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SpadeError(f"the embedded SR images need the {package!r} package, which is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / inner
    if not path.is_file():
        raise SpadeError(f"embedded SR image {inner} is missing from the installed {package!r} package")
    return path


def read_rgb(path: str | Path, min_size: int = 1) -> np.ndarray:
    """An image file as ``(H, W, 3)`` uint8 RGB (conversions and refusals: module doc)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise SpadeError(f"image {path} not found")
    with path.open("rb") as fh:
        head = fh.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) > 24 and head[24] == 16:
        raise SpadeError(f"{path} is a 16-bit PNG; convert it to 8 bits per channel first")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode.startswith("I") or mode == "F":
                raise SpadeError(f"{path} has {mode} pixels (16-bit or float); convert it to 8-bit RGB first")
            img = np.array(im.convert("RGB"))
    except SpadeError:
        raise
    except (UnidentifiedImageError, OSError) as exc:
        raise SpadeError(f"cannot read image {path} ({type(exc).__name__})") from None
    h, w = img.shape[:2]
    if min(h, w) < min_size:
        raise SpadeError(f"image {path.name} is {h} x {w}, smaller than the {min_size} x {min_size} the network needs")
    return img


def embedded_names(split: str) -> list[str]:
    if split not in SPLITS:
        raise SpadeError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return [n for n, (_, _, s) in EMBEDDED.items() if s == split]


def center_crop(img: np.ndarray, size: int | None) -> np.ndarray:
    """The central ``size x size`` (at most) of an image; ``None`` keeps it whole."""
    if size is None:
        return img
    h, w = img.shape[:2]
    ch, cw = min(h, size), min(w, size)
    top, left = (h - ch) // 2, (w - cw) // 2
    return img[top : top + ch, left : left + cw]


def embedded_images(split: str, crop: int | None = None) -> list[SRImage]:
    """The embedded photographs of a split, optionally centre-cropped to ``crop x crop``."""
    out = []
    for name in embedded_names(split):
        package, inner, _ = EMBEDDED[name]
        path = _package_file(package, inner)
        out.append(SRImage(name, center_crop(read_rgb(path), crop), f"{package}:{inner}"))
    return out


def embedded_digests() -> dict[str, str]:
    """Each embedded photograph's split and the SHA-256 of its file, by name (what identifies the
    embedded set: another package version may ship other bytes under the same name)."""
    return {name: f"{split}:{hashlib.sha256(_package_file(package, inner).read_bytes()).hexdigest()}"
            for name, (package, inner, split) in EMBEDDED.items()}


def folder_images(folder: str | Path, min_size: int = 8, crop: int | None = None) -> list[SRImage]:
    """The PNG / JPEG / BMP images directly in ``folder``, sorted by name, as RGB uint8."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SpadeError(f"image folder {folder} not found")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SpadeError(f"no PNG / JPEG / BMP images in {folder}")
    return [SRImage(p.stem, center_crop(read_rgb(p, min_size), crop), str(p)) for p in paths]
