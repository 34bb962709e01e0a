"""Accelerated multi-coil MRI (fastMRI): the task the DEQ, VarNet and E2E-VarNet solve.

Data: fastMRI-format HDF5 folders (:class:`~spade_deploy.mri.reader.SliceDataset`, the simulated default
dataset or a user's files). Measurements: each slice's own acquisition mask or a fastMRI
equispaced one (``acceleration``, ``center_fraction``; fastMRI's per-file seed for evaluation,
fresh random offsets for training), coil maps from the ACS block (ESPIRiT) or the file's
(``coil_maps``), operator ``A = P F S`` (:class:`~spade_deploy.mri.physics.MultiCoilMRI`). Reference:
``reconstruction_rss``; scores: fastMRI's ``evaluate()`` (PSNR / SSIM / NMSE per volume) beside
the zero-filled RSS baseline, and SENSE-referenced secondary scores on fully sampled data.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from . import reader, simulate
from .acquisition import eval_seeds, make_batch
from .reconstruct import reconstruct_checkpoint
from ..archive import Shard
from ..device import on_model_device
from ..errors import SpadeError
from .coilmaps import CoilMapEstimator, acs_block
from .metrics import EvaluationMetrics, VolumeMetrics, fastmri_crop, psnr, recon_magnitude, volume_metrics
from .physics import center_fraction_for, ifft2c, rss, synthetic_sample
from ..progress import Reporter
from ..options import CliOption, check_choice, check_number
from ..tasks import Batch, TableReport, Task, register_task
from .volumes import FORMATS

_TRAINED = ("train", "eval", "finetune", "reconstruct", "bench")  # the commands that measure k-space
_ESTIMATED = ("eval", "finetune", "reconstruct", "bench")  # ... and estimate coil maps from it


@register_task
class MRITask(Task):
    """Multi-coil MRI at ``acceleration`` (``center_fraction``: the default for it when ``None``);
    ``coil_maps`` "espirit" (from the ACS block) or "file"; ``cache_dir`` for estimated maps."""

    name = "mri"
    baseline_name = "zero-filled"
    reference_name = "reconstruction_rss"
    scores_name = "fastMRI evaluate() vs reconstruction_rss"
    bench_header = ("fastMRI's evaluate() against reconstruction_rss (SENSE PSNR: against the fully sampled SENSE "
                    "image)")

    secondary_columns = {"SENSE PSNR": ("psnr_sense", "{:.2f}")}

    cli_options = (
        CliOption("acceleration", int, 6, "Undersampling factor: 6, 8, 10 = the paper's 16.7 %, 12.5 %, 10 % sampling.",
                  _TRAINED, ("--acceleration", "-a")),
        CliOption("center_fraction", Optional[float], None,
                  "Fraction of auto-calibration lines (default per acceleration).", _TRAINED),
        CliOption("cache_dir", Optional[Path], None, "Cache of estimated coil maps (default: $XDG_CACHE_HOME/spade-deploy "
                  "or ~/.cache/spade-deploy; never the data folder).", _ESTIMATED),
        CliOption("coil_maps", str, "espirit", "espirit: estimated from each measurement's fully sampled centre (ACS) "
                  "only | file: the file's sens_maps, a reference no scanner gives (e.g. the simulation's true maps).",
                  ("eval", "reconstruct", "bench")),
        CliOption("full_fov", bool, False, "Keep the full field of view (default: crop to the header's recon size, as "
                  "fastMRI does).", ("reconstruct",), ("--full-fov",)),
        CliOption("output_format", str, "h5", "MRI output: h5 (fastMRI layout) | mrd (MRD images, uint16 with "
                  "RescaleSlope, geometry from the acquisitions) | dicom (a folder of DICOM files per input).",
                  ("reconstruct",), ("--format",)),
    )

    def __init__(self, acceleration: int = 6, center_fraction: float | None = None, coil_maps: str = "espirit",
                 cache_dir: str | Path | None = None):
        if isinstance(acceleration, bool) or not isinstance(acceleration, int) or not 1 <= acceleration <= 64:
            raise SpadeError(f"acceleration must be an integer in [1, 64], got {acceleration!r}")
        if center_fraction is not None and not (isinstance(center_fraction, (int, float))
                                                and not isinstance(center_fraction, bool) and 0 < center_fraction <= 1):
            raise SpadeError(f"center_fraction must be a finite number in (0, 1], got {center_fraction!r}")
        self.acceleration = acceleration
        self.center_fraction = center_fraction
        self.coil_maps = coil_maps
        self.cache_dir = cache_dir

    def recorded_options(self, manifest: dict) -> dict | None:
        """The manifest's ``task``; runs of earlier versions recorded the sampling in their
        ``train_config`` instead (the shipped base model among them)."""
        rec = super().recorded_options(manifest)
        if rec is not None:
            return rec
        cfg = manifest.get("train_config") or (manifest.get("train_state") or {}).get("train_config") or {}
        if "acceleration" not in cfg:
            return None
        cf = cfg.get("center_fraction")
        return {"acceleration": cfg["acceleration"],
                "center_fraction": cf if cf is not None else center_fraction_for(cfg["acceleration"])}

    @classmethod
    def from_cli(cls, data: Path | None, options: dict[str, Any]) -> "MRITask":
        acceleration, cf = options.get("acceleration", 6), options.get("center_fraction")
        check_number("--acceleration", acceleration, 1, 64)
        check_number("--center-fraction", cf, 0.0, 1.0, lo_open=True)
        coil_maps = options.get("coil_maps", "espirit")
        if coil_maps not in ("espirit", "file"):
            raise SpadeError(f"unknown coil-map source {coil_maps!r}; choose espirit or file")
        return cls(acceleration, cf, coil_maps, options.get("cache_dir"))

    def data_root(self, data: Path | None, reporter=None) -> Path:
        """``data``, or the embedded dataset (simulated on first use)."""
        if data is not None:
            return data
        root = simulate.default_data_root()
        if not (root / "dataset.json").exists():
            reporter = reporter or Reporter()
            reporter.note(f"Building the embedded default dataset in {root} …")
            with reporter.progress("simulating k-space") as update:
                simulate.build_default_dataset(root, seed=0, progress=update)
        return root

    def dataset_key(self, root: str | Path | None) -> dict | None:
        """The embedded dataset's generator version, seed and simulation config (its dataset.json)."""
        if root is None:
            return None
        try:
            manifest = json.loads((Path(root) / "dataset.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("format") != "spade-deploy/default-dataset":
            return None
        return {k: manifest.get(k) for k in ("format", "generator_version", "seed", "config")}

    @property
    def cf(self) -> float:
        return self.center_fraction if self.center_fraction is not None else center_fraction_for(self.acceleration)

    def options(self) -> dict:
        return {"acceleration": self.acceleration, "center_fraction": self.cf, "coil_maps": self.coil_maps}

    def dataset(self, root: str | Path, split: str | None = None) -> reader.SliceDataset:
        path = Path(root) / split if split else Path(root)
        return reader.SliceDataset(path, coil_maps=self.coil_maps, cache_dir=self.cache_dir)  # type: ignore[arg-type]

    def has_ground_truth(self, dataset: reader.SliceDataset) -> bool:
        return dataset.has_ground_truth

    def check_ground_truth(self, dataset: reader.SliceDataset, who: str, where: str | Path) -> None:
        if not dataset.has_ground_truth:
            raise SpadeError(f"{who} needs ground truth, but {where} has no reconstruction_rss")
        if not dataset.fully_sampled:
            raise SpadeError(f"{who} trains on fully sampled k-space, but files in {where} carry "
                             "an acquisition mask (already undersampled)")

    def collate(self, items: list) -> Any:
        """A batch of slices and, for estimated maps, the ESPIRiT maps of its measurements made
        here: in the loader's worker processes when there are any (``--workers``), so that the
        training or evaluation process does not wait on them. The maps depend only on the ACS
        columns, which every mask of this task's sampling shares (fastMRI's equispaced masks keep
        the centre block whatever their offset; an acquired mask its own)."""
        batch = reader.collate(items)
        estimator = batch["coil_maps"]
        if batch["smaps"] is None and isinstance(estimator, CoilMapEstimator):
            width = batch["kspace"].shape[-1]
            try:
                blocks = [acs_block(m.numpy() if m is not None else None, width, self.cf) for m in batch["mask"]]
                batch["coil_maps"] = estimator.precomputed(batch["kspace"].numpy(), blocks)
            except SpadeError:
                pass  # the measurement reports the fault, in the calling process
        return batch

    def prior_size(self, dataset: reader.SliceDataset) -> tuple[int, int]:
        return tuple(dataset[0]["kspace"].shape[-2:])

    def train_batch(self, items: Any) -> Batch:
        # one fresh mask offset per slice from NumPy's global state
        seeds = [np.random.randint(0, 2**31 - 1) for _ in items["fname"]]
        return make_batch(items, self.acceleration, self.cf, seeds)

    def eval_batch(self, items: Any) -> Batch:
        return make_batch(items, self.acceleration, self.cf, eval_seeds(items))

    def pretrain_batch(self, items: Any) -> Batch:
        return make_batch(items, self.acceleration, self.cf, None)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, dataset: Dataset, solver=None, batch_size: int = 4,
                 on_batch: Callable[[int, int], None] | None = None) -> "EvalResult":
        """fastMRI's ``evaluate()`` on what ``spade reconstruct`` writes.

        Each slice is measured as ``reconstruct`` measures it (fastMRI's per-file mask seed, or the
        file's own mask; coil maps from the ACS block), its reconstruction's magnitude is cropped to
        the header's recon size, and PSNR / SSIM / NMSE are fastMRI's: per volume against
        ``reconstruction_rss``, both centre-cropped to the target's width squared, ``data_range`` the
        target volume's maximum, averaged over volumes. Zero-filled is fastMRI's RSS of the
        zero-filled k-space, cropped likewise. ``psnr_sense`` / ``ssim_sense`` score against the
        magnitude of the fully sampled SENSE image of the same maps (fully sampled data only).
        Slices whose fixed-point solve stopped on its cap are listed in ``not_converged``.
        """
        model.eval()
        iters, resid, conv, not_converged = [], [], [], []
        coil_maps = "espirit"
        # the model's device (a deployed model's priors may run elsewhere; its operator runs here)
        device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
        loader = self.loader(dataset, batch_size, shuffle=False, seed=0)
        kwargs = {"solver": solver} if solver is not None and model.solver_cfg is not None else {}
        volumes = _VolumeScores(dataset, loader)
        t0 = time.perf_counter()
        for i, (indices, items) in enumerate(zip(volumes.batches, loader)):
            batch = on_model_device(self.eval_batch(items), model)
            if items["smaps"] is not None:
                coil_maps = "file"
            if batch.target is None:
                raise SpadeError("evaluation needs ground truth (reconstruction_rss), which this data lacks")
            x = model(batch.y.to(device), batch.physics.to(device), **kwargs)
            out = recon_magnitude(x, batch.meta["recon_size"]).cpu()
            zf = recon_magnitude(rss(ifft2c(batch.y), dim=1), batch.meta["recon_size"])
            ref_sense = recon_magnitude(batch.x_gt, batch.meta["recon_size"]) if batch.x_gt is not None else None
            info = model.solve_info()
            if info is not None:
                iters += info.iterations.tolist()
                resid += info.residual.tolist()
                flags = info.converged.tolist()
                conv += flags
                not_converged += [f"{f}:{s}" for f, s, c in zip(batch.meta["fnames"], batch.meta["slices"], flags) if not c]
            for b, (idx, f, s) in enumerate(zip(indices, batch.meta["fnames"], batch.meta["slices"])):
                volumes.add(idx, f, s, batch.target[b].cpu().numpy(), out[b].numpy(), zf[b].cpu().numpy(),
                            ref_sense[b].cpu().numpy() if ref_sense is not None else None)
            del items, batch, x, out, zf, ref_sense  # before the next batch is read, not after
            if on_batch:
                on_batch(i + 1, len(loader))
        seconds = time.perf_counter() - t0
        rec, base, sense_m = volumes.results()
        return EvalResult(
            psnr=rec.psnr,
            ssim=rec.ssim,
            nmse=rec.nmse,
            psnr_zero_filled=base.psnr,
            ssim_zero_filled=base.ssim,
            nmse_zero_filled=base.nmse,
            psnr_sense=sense_m.psnr if sense_m else None,
            ssim_sense=sense_m.ssim if sense_m else None,
            mean_iterations=float(np.mean(iters)) if iters else None,
            max_residual=float(np.max(resid)) if resid else None,
            all_converged=bool(all(conv)) if conv else None,
            not_converged=not_converged,
            n_slices=volumes.n_slices,
            coil_maps=coil_maps,
            espirit=(dataclasses.asdict(dataset.estimator.params)
                     if coil_maps == "espirit" and hasattr(dataset, "estimator") else None),
            per_volume={f: {"psnr": m.psnr, "ssim": m.ssim, "nmse": m.nmse} for f, m in rec.per_volume.items()},
            seconds=seconds,
        )

    def secondary_scores(self, scores: "EvalResult") -> dict[str, Any]:
        return {"nmse": scores.nmse, "psnr_sense": scores.psnr_sense, "ssim_sense": scores.ssim_sense}

    def result_config(self, scores: "EvalResult") -> dict[str, Any]:
        return {"coil_maps": scores.coil_maps}

    # As scored: reconstruction_rss and the header-size magnitude, both in fastMRI's crop.
    def _shown_pair(self, batch: Batch, x: torch.Tensor):
        return fastmri_crop(batch.target, recon_magnitude(x, batch.meta["recon_size"]))

    def baseline(self, batch: Batch) -> torch.Tensor:
        """Zero-filled: the RSS of the zero-filled k-space."""
        return rss(ifft2c(batch.y), dim=1)

    def shown_reference(self, batch: Batch) -> np.ndarray:
        return self._shown_pair(batch, batch.target)[0][0].numpy()

    def shown(self, batch: Batch, x: torch.Tensor) -> np.ndarray:
        return self._shown_pair(batch, x)[1][0].numpy()

    def reconstruct(self, checkpoint: Path, source: Path, out: Path, backend: str = "auto",
                    engines: Path | None = None, batch_size: int = 4, options: dict[str, Any] | None = None,
                    reporter: Reporter | None = None) -> list[str]:
        """fastMRI-format HDF5, MRD image or DICOM outputs (``options``: ``full_fov``,
        ``output_format``; :func:`~spade_deploy.mri.reconstruct.reconstruct_checkpoint`)."""
        options = options or {}
        full_fov, output_format = options.get("full_fov", False), options.get("output_format", "h5")
        check_choice("--format", output_format, FORMATS)
        res = reconstruct_checkpoint(checkpoint, source, out, self.acceleration, self.center_fraction, batch_size,
                                     backend, engines, full_fov, self.coil_maps, self.cache_dir, reporter=reporter,
                                     output_format=output_format, shard=options.get("shard", Shard()),
                                     skip_existing=options.get("skip_existing", False))
        iters = f", mean {res.mean_iterations:.1f} fixed-point iterations" if res.mean_iterations is not None else ""
        what = {"h5": "files", "mrd": "MRD image files", "dicom": "DICOM series"}[output_format]
        written = len(res.outputs) - len(res.skipped)
        lines = [f"{res.n_slices} slices in {written} {what} written to [cyan]{out}[/]{iters}"]
        if res.skipped:
            lines.append(f"{len(res.skipped)} up to date (same checkpoint, settings and input), skipped")
        if res.shard.count > 1:
            lines.append(f"shard {res.shard}: {len(res.outputs)} of the {res.n_files} inputs")
        if res.not_converged:
            lines.append(f"[red]{len(res.not_converged)} slices hit the iteration cap (not converged):[/] "
                         f"{', '.join(res.not_converged)}")
        return lines

    def score_table(self, scores: "EvalResult", model: str, split: str) -> TableReport:
        """fastMRI's scores beside zero-filled (and against the SENSE image where there is one),
        the solver's iterations and the gain."""
        res = scores
        maps = "estimated from the ACS block" if res.coil_maps == "espirit" else "the files' sens_maps (reference)"
        sense = res.psnr_sense is not None
        cols = ["method", "PSNR (dB)", "SSIM", "NMSE"] + (["PSNR vs SENSE", "SSIM vs SENSE"] if sense else [])
        rows = [["zero-filled (RSS)", f"{res.psnr_zero_filled:.2f}", f"{res.ssim_zero_filled:.4f}",
                 f"{res.nmse_zero_filled:.4f}", *(["", ""] if sense else [])],
                [model, f"{res.psnr:.2f}", f"{res.ssim:.4f}", f"{res.nmse:.4f}",
                 *([f"{res.psnr_sense:.2f}", f"{res.ssim_sense:.4f}"] if sense else [])]]
        notes = []
        if res.mean_iterations is not None:
            notes.append(
                f"fixed point: mean {res.mean_iterations:.1f} iterations, max relative residual {res.max_residual:.2e}, "
                + ("all slices converged" if res.all_converged else
                   f"[red]{len(res.not_converged)} slices hit the iteration cap:[/] {', '.join(res.not_converged)}"))
        notes.append(f"gain over zero-filled: {res.psnr - res.psnr_zero_filled:+.2f} dB; {res.seconds:.1f} s")
        return TableReport(f"{model} on {split} ({res.n_slices} slices, acceleration {self.acceleration}; fastMRI's "
                           f"scores against reconstruction_rss; coil maps {maps})", cols, ["right"] * len(cols), rows,
                           notes)

    def build_data(self, root: Path | None, seed: int = 0, force: bool = False,
                   reporter: Reporter | None = None) -> TableReport:
        """``spade data``: the embedded dataset built under ``root`` (default
        :func:`~spade_deploy.mri.simulate.default_data_root`) unless a complete build is there
        (``force``: again), and a table of its splits."""
        root = Path(root) if root is not None else simulate.default_data_root()
        reporter = reporter or Reporter()
        with reporter.progress("simulating k-space") as update:
            simulate.build_default_dataset(root, seed=seed, force=force, progress=update)
        rows = []
        for split in simulate.SPLITS:
            ds = reader.SliceDataset(root / split)
            item = ds[0]
            rows.append([split, str(len(ds.files)), str(len(ds)), str(item["kspace"].shape[0]),
                         "x".join(map(str, item["kspace"].shape[-2:]))])
        return TableReport(f"Embedded dataset at {root}", ["split", "volumes", "slices", "coils", "size"],
                           ["left"] * 5, rows, [str(root.resolve())])

    def synthetic_sample(self, height: int, width: int, device: str = "cpu", seed: int = 0):
        return synthetic_sample(height, width, device=device, seed=seed)

    def example_psnr(self, reference, image) -> float:
        return psnr(reference[None], image[None])


@dataclass
class EvalResult:
    """fastMRI's scores against ``reconstruction_rss`` (the default), beside the zero-filled
    baseline (fastMRI's RSS of the zero-filled k-space) and, where the data is fully sampled,
    the scores against the magnitude of the fully sampled SENSE image of the same estimated maps
    (``*_sense``: what the DEQ is trained towards)."""

    psnr: float
    ssim: float
    psnr_zero_filled: float
    ssim_zero_filled: float
    mean_iterations: float | None
    max_residual: float | None
    all_converged: bool | None
    n_slices: int
    nmse: float = float("nan")
    nmse_zero_filled: float = float("nan")
    psnr_sense: float | None = None
    ssim_sense: float | None = None
    not_converged: list[str] = field(default_factory=list)  # "file.h5:slice" on the iteration cap
    reference: str = "reconstruction_rss"
    coil_maps: str = "espirit"
    espirit: dict | None = None  # the ESPIRiT settings of estimated maps
    per_volume: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def psnr_baseline(self) -> float:
        return self.psnr_zero_filled

    @property
    def ssim_baseline(self) -> float:
        return self.ssim_zero_filled


class _VolumeScores:
    """fastMRI's scores of each volume, taken as soon as its last slice is reconstructed, so that
    evaluation holds the arrays of the volumes in progress only (one, in the loader's order) rather
    than of the whole split. A dataset without ``volume_key`` (which file a sample belongs to)
    keeps every slice until the end, scored by file name as before."""

    def __init__(self, dataset: Dataset, loader):
        self.batches = [list(b) for b in loader.batch_sampler]  # the loader's batches, in its order
        key = getattr(dataset, "volume_key", None)
        self.volume_of = key if callable(key) else (lambda idx: None)
        self.left: dict = {}
        for b in self.batches:
            for idx in b:
                v = self.volume_of(idx)
                if v is not None:
                    self.left[v] = self.left.get(v, 0) + 1
        self.open: dict[str, dict[int, tuple]] = {}  # fname -> slice -> (gt, pred, zero-filled, sense ref)
        self.rec: dict[str, VolumeMetrics] = {}
        self.base: dict[str, VolumeMetrics] = {}
        self.sense: dict[str, VolumeMetrics] = {}
        self.sense_complete = True
        self.n_slices = 0

    def add(self, idx: int, fname: str, s: int, gt, pred, zf, sense_ref) -> None:
        self.open.setdefault(fname, {})[s] = (gt, pred, zf, sense_ref)
        self.n_slices += 1
        v = self.volume_of(idx)
        if v is not None:
            self.left[v] -= 1
            if self.left[v] == 0:
                self._score(fname)

    def _score(self, fname: str) -> None:
        slices = self.open.pop(fname)
        order = sorted(slices)

        def vol(j):
            return np.stack([slices[s][j] for s in order])

        gt = vol(0)
        self.rec[fname] = volume_metrics(*fastmri_crop(gt, vol(1)))
        self.base[fname] = volume_metrics(*fastmri_crop(gt, vol(2)))
        if all(slices[s][3] is not None for s in order):
            self.sense[fname] = volume_metrics(*fastmri_crop(vol(3), vol(1)))
        else:
            self.sense_complete = False

    def results(self) -> tuple[EvaluationMetrics, EvaluationMetrics, EvaluationMetrics | None]:
        for fname in list(self.open):
            self._score(fname)
        if not self.rec:
            raise SpadeError("no volumes to evaluate")
        sense = EvaluationMetrics(self.sense) if self.sense and self.sense_complete else None
        return EvaluationMetrics(self.rec), EvaluationMetrics(self.base), sense
