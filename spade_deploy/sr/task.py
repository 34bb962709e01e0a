"""Single-image super-resolution (USRNet's task): ``y = (x (*) k) |s + n``.

Data: the embedded photographs (:mod:`spade_deploy.sr.data`: train / val / test) or a user's folder
of PNG / JPEG / BMP images with the same three sub-folders (``--data``). Training samples are
non-overlapping ``patch x patch`` tiles of the training images, degraded afresh at every step: one
scale per batch and one kernel per tile, drawn from the task's scales and kernels with the global
random states (which the trainer seeds and checkpoints). Evaluation samples are *cases*, every
(image, scale, kernel) of a split, degraded by the official recipe (modcrop to ``lcm(s, 8)``,
circular blur, the standard downsampler, the uint8 truncation; :func:`~spade_deploy.sr.degradation.degrade`),
deterministically: fine-tuning on the test measurements (school, self-supervised) learns from
exactly the LR images evaluation scores. Reference: the HR image; scores: USRNet's official PSNR /
SSIM (RGB uint8, border ``scale**2``) per image, averaged per scale and kernel, beside bicubic
upsampling on the downsampler's grid.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import SpadeError
from ..options import CliOption
from . import data as srdata
from .baseline import bicubic_upsample
from .degradation import crop_multiple, degrade, degrade_tensor
from .kernels import kernel_names, paper_kernels, parse_kernels
from .metrics import SRRow, mean_scores, psnr, sr_scores, to_uint8
from .physics import SRPhysics, check_kernel, check_scale
from .usrnet import padded_size
from ..progress import Reporter
from ..tasks import Batch, TableReport, Task, register_task
from .reconstruct import restore_checkpoint
from ..archive import Shard

DEFAULT_SCALES = (2, 3, 4)
_COMMANDS = ("train", "eval", "finetune", "reconstruct", "bench")  # the commands that degrade images


class SRPatches(Dataset):
    """Non-overlapping ``patch x patch`` tiles of ``images`` (``(3, patch, patch)`` floats in [0, 1])."""

    def __init__(self, images: list[srdata.SRImage], patch: int):
        self.images, self.patch = images, patch
        self.index = []
        for i, im in enumerate(images):
            h, w = im.image.shape[:2]
            if min(h, w) < patch:
                raise SpadeError(f"training image {im.name} is {h} x {w}, smaller than the {patch} x {patch} patches")
            self.index += [(i, top, left) for top in range(0, h - patch + 1, patch) for left in range(0, w - patch + 1, patch)]

    def __len__(self) -> int:
        return len(self.index)

    def group_key(self, idx: int) -> tuple:
        return (self.patch,)

    def __getitem__(self, idx: int) -> dict:
        i, top, left = self.index[idx]
        tile = self.images[i].image[top : top + self.patch, left : left + self.patch]
        return {"hr": torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1).float() / 255.0,
                "key": (self.images[i].name, top, left), "scale": None, "kernel": None}


class SRCases(Dataset):
    """Every (image, scale, kernel) of ``images``: the HR image cropped to ``lcm(scale, 8)``, its LR
    image by the official recipe (:func:`degrade`, noise ``noise`` seeded per case)."""

    def __init__(self, images: list[srdata.SRImage], scales, kernels: dict[str, np.ndarray], noise: float):
        if not images:
            raise SpadeError("no images to evaluate")
        self.images, self.scales, self.kernels, self.noise = images, [check_scale(s) for s in scales], kernels, noise
        self.index = [(i, s, k) for s in self.scales for k in kernels for i in range(len(images))]

    def __len__(self) -> int:
        return len(self.index)

    def group_key(self, idx: int) -> tuple:
        i, s, k = self.index[idx]
        h, w = self.images[i].image.shape[:2]
        m = crop_multiple(s)
        return (h - h % m, w - w % m, s, self.kernels[k].shape)

    def __getitem__(self, idx: int) -> dict:
        i, s, k = self.index[idx]
        hr, lr = degrade(self.images[i].image, self.kernels[k], s, self.noise, seed=idx)
        return {"hr": torch.from_numpy(np.ascontiguousarray(hr)).permute(2, 0, 1).float() / 255.0,
                "lr": torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1),
                "key": (self.images[i].name, s, k), "scale": s, "kernel": k}


@dataclass
class SREvalResult:
    """Mean over every (scale, kernel) of the per-image scores (and per scale and kernel: ``rows``)."""

    psnr: float
    ssim: float
    psnr_baseline: float  # bicubic
    ssim_baseline: float
    rows: list[SRRow]
    n_images: int
    mean_iterations: float | None = None
    all_converged: bool | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def by_scale(self) -> dict[int, dict[str, float]]:
        """Mean PSNR / SSIM (and bicubic's) per scale over its kernels."""
        out = {}
        for s in dict.fromkeys(r.scale for r in self.rows):
            mine = [r for r in self.rows if r.scale == s]
            out[s] = {k: float(np.mean([getattr(r, k) for r in mine])) for k in ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic")}
        return out


@register_task
class SRTask(Task):
    """Super-resolution at ``scales`` with blur ``kernels`` (name -> 2-D kernel; default the 12 of
    the papers) and white noise ``noise`` (on the [0, 1] scale). ``data``: a folder with train/
    val/ test/ image folders (default: the embedded photographs); ``crop``: evaluation images
    centre-cropped to ``crop x crop`` (None: whole); ``patch``: the training tiles' side."""

    name = "sr"
    baseline_name = "bicubic"
    reference_name = "HR image"
    scores_name = "USRNet official PSNR / SSIM (RGB uint8, border scale^2) vs the HR image"
    bench_header = ("USRNet's official PSNR / SSIM against the HR image (RGB uint8, border of scale² pixels), "
                    "mean over the scales and kernels")

    def __init__(self, scales=DEFAULT_SCALES, kernels: dict[str, np.ndarray] | None = None, noise: float = 0.0,
                 data: str | Path | None = None, crop: int | None = 192, patch: int = 48):
        self.scales = tuple(check_scale(s) for s in scales)
        if not self.scales:
            raise SpadeError("no scale factor given")
        if kernels is None:
            kernels = dict(zip(kernel_names(), paper_kernels()))
        self.kernels = {name: check_kernel(k).numpy() for name, k in kernels.items()}
        if not self.kernels:
            raise SpadeError("no blur kernel given")
        if not (isinstance(noise, (int, float)) and math.isfinite(noise) and 0 <= noise <= 1):
            raise SpadeError(f"noise level must be a number in [0, 1] (the [0, 1] intensity scale), got {noise!r}")
        self.noise = float(noise)
        self.data = Path(data) if data is not None else None
        multiple = math.lcm(*(crop_multiple(s) for s in self.scales))
        for what, value in (("crop", crop), ("patch", patch)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < multiple):
                raise SpadeError(f"{what} must be an integer of at least {multiple} (lcm of the scales and 8), got {value!r}")
        if patch % multiple:
            raise SpadeError(f"patch must be a multiple of {multiple} (every scale's crop multiple), got {patch}")
        biggest = max(max(k.shape) for k in self.kernels.values())
        if biggest > patch:
            raise SpadeError(f"blur kernel of {biggest} pixels is larger than the {patch} x {patch} training patches")
        self.crop, self.patch = crop, patch

    cli_options = (
        CliOption("scale", Optional[list[int]], None, "Super-resolution: scale factor (repeatable; 1-4; default 2 3 4).",
                  _COMMANDS),
        CliOption("kernel", Optional[list[str]], None, "Super-resolution: blur kernel, k1..k12 (the papers' 12) or a "
                  ".npy / .mat file of a 2-D kernel summing to one (repeatable; default the 12).", _COMMANDS),
        CliOption("noise", float, 0.0, "Super-resolution: standard deviation of the white noise on the [0, 1] "
                  "intensity scale (default 0, as the papers' tables).", _COMMANDS),
    )

    @classmethod
    def from_cli(cls, data: Path | None, options: dict[str, Any]) -> "SRTask":
        """``scale``: a list of factors (default 2 3 4); ``kernel``: names ``k1`` .. ``k12`` or
        ``.npy`` / ``.mat`` files (default the 12); ``noise``: the noise level."""
        scales = options.get("scale") or DEFAULT_SCALES
        for s in scales:
            check_scale(s)
        kernels = parse_kernels(options["kernel"]) if options.get("kernel") else None
        extra = {k: options[k] for k in ("crop", "patch") if options.get(k) is not None}
        return cls(scales, kernels, options.get("noise") or 0.0, data, **extra)

    def options(self) -> dict:
        return {"scales": list(self.scales), "kernels": list(self.kernels), "noise": self.noise,
                "data": str(self.data) if self.data else "embedded", "crop": self.crop, "patch": self.patch}

    def dataset_key(self, root: str | Path | None) -> dict | None:
        """The embedded photographs (each file's SHA-256), the kernels' values, the noise and the
        tile and crop sizes; None for a user's folder."""
        if root is not None or self.data is not None:
            return None
        kernels = hashlib.sha256()
        for k in self.kernels.values():
            kernels.update(np.ascontiguousarray(k, dtype=np.float64).tobytes())
        return {"format": "spade-deploy/sr-embedded", "images": srdata.embedded_digests(),
                "scales": list(self.scales), "kernels": kernels.hexdigest(), "noise": self.noise,
                "crop": self.crop, "patch": self.patch}

    # -- data ----------------------------------------------------------------------------------
    def images(self, split: str, root: str | Path | None = None) -> list[srdata.SRImage]:
        folder = Path(root) if root is not None else self.data
        if folder is None:
            return srdata.embedded_images(split, crop=None if split == "train" else self.crop)
        if split not in srdata.SPLITS:
            raise SpadeError(f"unknown split {split!r}; choose one of: {', '.join(srdata.SPLITS)}")
        return srdata.folder_images(folder / split, min_size=min(self.patch, self.crop or self.patch),
                                    crop=None if split == "train" else self.crop)

    def has_split(self, root: str | Path | None, split: str) -> bool:
        folder = Path(root) if root is not None else self.data
        return folder is None or (folder / split).is_dir()

    def dataset(self, root: str | Path | None, split: str) -> Dataset:
        """The training tiles (train) or the degraded cases (val, test) of a split."""
        if split == "train":
            return SRPatches(self.images(split, root), self.patch)
        return SRCases(self.images(split, root), self.scales, self.kernels, self.noise)

    def collate(self, items: list) -> dict:
        out = {"hr": torch.stack([it["hr"] for it in items]), "keys": [it["key"] for it in items],
               "scale": items[0]["scale"], "kernel": [it["kernel"] for it in items]}
        if "lr" in items[0]:
            out["lr"] = torch.stack([it["lr"] for it in items])
        return out

    def prior_size(self, dataset: Dataset) -> tuple[int, int]:
        h, w = dataset[0]["hr"].shape[-2:]
        return padded_size(h), padded_size(w)

    def reconstruct(self, checkpoint: Path, source: Path, out: Path, backend: str = "auto",
                    engines: Path | None = None, batch_size: int = 4, options: dict[str, Any] | None = None,
                    reporter: Reporter | None = None) -> list[str]:
        """SR PNGs of the low-resolution images under ``source``, degraded at this task's one scale
        with its one kernel (:func:`~spade_deploy.sr.reconstruct.restore_checkpoint`)."""
        if len(self.scales) != 1 or len(self.kernels) != 1:
            raise SpadeError("super-resolution reconstruct needs the images' degradation: exactly one --scale and one --kernel")
        res = restore_checkpoint(checkpoint, source, out, self.scales[0], next(iter(self.kernels.items())), self.noise,
                                 backend, engines, reporter=reporter, shard=(options or {}).get("shard", Shard()),
                                 skip_existing=(options or {}).get("skip_existing", False))
        lines = [f"{len(res.outputs) - len(res.skipped)} images super-resolved x{res.scale} (kernel {res.kernel}) "
                 f"into [cyan]{out}[/]"]
        if res.skipped:
            lines.append(f"{len(res.skipped)} up to date (same checkpoint, degradation and input), skipped")
        if res.shard.count > 1:
            lines.append(f"shard {res.shard}: {len(res.outputs)} of the {res.n_files} inputs")
        return lines

    def score_table(self, scores, model: str, split: str) -> TableReport:
        """A row per kernel, the model's / bicubic's PSNR and SSIM per scale, their means."""
        res = scores
        scales = list(dict.fromkeys(r.scale for r in res.rows))
        cols = ["kernel"] + [c for s in scales for c in (f"x{s} PSNR", f"x{s} SSIM")]
        rows = []
        for k in dict.fromkeys(r.kernel for r in res.rows):
            cells = []
            for s in scales:
                r = next((r for r in res.rows if r.scale == s and r.kernel == k), None)
                cells += ([f"{r.psnr:.2f} / {r.psnr_bicubic:.2f}", f"{r.ssim:.4f} / {r.ssim_bicubic:.4f}"] if r
                          else ["–", "–"])
            rows.append([k, *cells])
        means = res.by_scale()
        rows.append(["[bold]mean[/]", *[c for s in scales for c in (f"{means[s]['psnr']:.2f} / {means[s]['psnr_bicubic']:.2f}",
                                                                     f"{means[s]['ssim']:.4f} / {means[s]['ssim_bicubic']:.4f}")]])
        return TableReport(f"{model} on {split} ({res.n_images} images; {self.scores_name}; "
                           f"{model} / {self.baseline_name} PSNR (dB) and SSIM per scale)", cols,
                           ["left"] + ["right"] * (len(cols) - 1), rows,
                           [f"mean over scales and kernels: {res.psnr:.2f} dB (gain over {self.baseline_name}: "
                            f"{res.psnr - res.psnr_baseline:+.2f} dB); {res.seconds:.1f} s"])

    def synthetic_sample(self, height: int, width: int, device: str = "cpu", seed: int = 0):
        """A random low-resolution RGB image of ``height x width`` degraded at the task's first
        scale with its first kernel."""
        g = torch.Generator().manual_seed(seed)
        physics = SRPhysics(torch.from_numpy(next(iter(self.kernels.values()))), self.scales[0], self.noise).to(device)
        return torch.rand(1, 3, height, width, generator=g).to(device), physics

    # -- batches -------------------------------------------------------------------------------
    def train_batch(self, items: dict) -> Batch:
        """Tiles degraded afresh: one scale for the batch, one kernel per tile (global NumPy state),
        the uint8 truncation of the official recipe, noise from torch's global state."""
        if "lr" in items:  # cases: measured as evaluation measures them
            return self.eval_batch(items)
        scale = self.scales[np.random.randint(len(self.scales))]
        names = list(self.kernels)
        chosen = [names[np.random.randint(len(names))] for _ in items["keys"]]
        kernel = torch.from_numpy(np.stack([self.kernels[n] for n in chosen]))[:, None]
        hr = items["hr"]
        physics = SRPhysics(kernel, scale, self.noise)
        y = degrade_tensor(hr, physics, self.noise)
        return Batch(y=y, physics=physics, x_gt=hr, target=hr, keys=list(items["keys"]),
                     meta={"scale": scale, "kernels": chosen})

    def baseline_error(self, batch: Batch) -> torch.Tensor:
        """Bicubic upsampling's squared error per sample, floored at one grey level per pixel (the
        uint8 grid the measurements and scores live on)."""
        error = (self.baseline(batch).clamp(0, 1) - batch.x_gt).pow(2).flatten(1)
        return error.sum(1).clamp_min(error.shape[1] / 255.0**2)

    def eval_batch(self, items: dict) -> Batch:
        if "lr" not in items:
            raise SpadeError("training tiles have no fixed degradation; evaluate on the val or test split")
        kernel = torch.from_numpy(np.stack([self.kernels[n] for n in items["kernel"]]))[:, None]
        physics = SRPhysics(kernel, items["scale"], self.noise)
        return Batch(y=items["lr"], physics=physics, x_gt=items["hr"], target=items["hr"], keys=list(items["keys"]),
                     meta={"scale": items["scale"], "kernels": list(items["kernel"])})

    # -- scores --------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, dataset: Dataset, solver=None, batch_size: int = 4,
                 on_batch: Callable[[int, int], None] | None = None) -> SREvalResult:
        if not isinstance(dataset, SRCases):
            raise SpadeError("super-resolution is evaluated on degraded cases (the val or test split)")
        model.eval()
        device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
        groups: dict[tuple[int, str], dict[str, dict[str, float]]] = {}
        bicubic: dict[tuple[int, str], list[dict[str, float]]] = {}
        loader = self.loader(dataset, batch_size, shuffle=False, seed=0)
        t0 = time.perf_counter()
        for i, items in enumerate(loader):
            batch = self.eval_batch(items)
            x = model(batch.y.to(device), batch.physics.to(device)).cpu()
            base = bicubic_upsample(batch.y, batch.meta["scale"])
            for b, (name, s, k) in enumerate(batch.keys):
                hr = to_uint8(batch.target[b : b + 1])
                groups.setdefault((s, k), {})[name] = sr_scores(hr, x[b : b + 1], s)
                bicubic.setdefault((s, k), []).append(sr_scores(hr, base[b : b + 1], s))
            if on_batch:
                on_batch(i + 1, len(loader))
        rows = []
        for (s, k) in sorted(groups, key=lambda g: (g[0], list(self.kernels).index(g[1]))):
            mean, base = mean_scores(list(groups[(s, k)].values())), mean_scores(bicubic[(s, k)])
            rows.append(SRRow(s, k, mean["psnr"], mean["ssim"], base["psnr"], base["ssim"], groups[(s, k)]))
        if not rows:
            raise SpadeError("no images to evaluate")
        return SREvalResult(
            psnr=float(np.mean([r.psnr for r in rows])), ssim=float(np.mean([r.ssim for r in rows])),
            psnr_baseline=float(np.mean([r.psnr_bicubic for r in rows])),
            ssim_baseline=float(np.mean([r.ssim_bicubic for r in rows])),
            rows=rows, n_images=len(dataset.images), seconds=time.perf_counter() - t0)

    # -- figures -------------------------------------------------------------------------------
    def baseline(self, batch: Batch) -> torch.Tensor:
        return bicubic_upsample(batch.y, batch.meta["scale"])

    def shown_reference(self, batch: Batch) -> np.ndarray:
        return to_uint8(batch.target[:1]).astype(np.float64) / 255.0

    def shown_input(self, batch: Batch) -> np.ndarray:
        """The LR image, each pixel repeated ``scale x scale`` times (the size of the others)."""
        s = batch.meta["scale"]
        return to_uint8(batch.y[:1].repeat_interleave(s, -2).repeat_interleave(s, -1)).astype(np.float64) / 255.0

    def shown(self, batch: Batch, x: torch.Tensor) -> np.ndarray:
        return to_uint8(x[:1]).astype(np.float64) / 255.0

    def example_psnr(self, reference, image) -> float:
        """USRNet's PSNR of the whole shown images (no border: a figure shows them whole)."""
        return psnr(np.uint8(np.round(reference * 255)), np.uint8(np.round(image * 255)))


__all__ = ["SRTask", "SRPatches", "SRCases", "SREvalResult", "SRRow"]
