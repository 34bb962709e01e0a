"""Benchmark: quality and latency of unpruned and pruned reconstructors on every back-end.

Every variant runs the same reconstructor loop under the same stopping rule (tolerance and
iteration cap); latency is the median wall time of a whole reconstruction of one slice after
warm-up, device-synchronised (CUDA events on a GPU). Speed-ups are ratios measured in the same run:
against the unpruned PyTorch model (pruning + deployment) and against the unpruned model on the
same back-end (pruning alone).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .io import atomic_path, write_json, write_text
from .models import Reconstructor, count_parameters
from .solvers import SolverConfig
from .data import collate as D_collate
from .train import EvalResult, _loader, eval_seeds, evaluate, make_batch


@dataclass
class Variant:
    """One model to benchmark: the unpruned model (ratio 0, strategy None) or a fine-tuned pruned one."""

    label: str
    ratio: float
    strategy: str | None
    model: Reconstructor


@dataclass
class BenchRow:
    label: str
    ratio: float
    strategy: str | None
    backend: str
    params: int
    macs: int | None
    psnr: float  # fastMRI's, against reconstruction_rss
    ssim: float
    mean_iterations: float | None
    all_converged: bool | None
    latency_ms: float
    latency_iqr_ms: float
    speedup_vs_torch: float = 1.0
    speedup_same_backend: float = 1.0
    nmse: float = float("nan")
    psnr_sense: float | None = None  # against the fully sampled SENSE image of the same maps
    ssim_sense: float | None = None


@dataclass
class BenchResult:
    rows: list[BenchRow]
    config: dict
    device: str
    psnr_zero_filled: float
    examples: dict = field(default_factory=dict)
    ssim_zero_filled: float = float("nan")

    def as_dict(self) -> dict:
        return {"device": self.device, "config": self.config, "psnr_zero_filled": self.psnr_zero_filled,
                "ssim_zero_filled": self.ssim_zero_filled, "rows": [dataclasses.asdict(r) for r in self.rows]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_reconstruction(model: Reconstructor, y: torch.Tensor, physics, warmup: int = 1, repeats: int = 5,
                        solver: SolverConfig | None = None) -> list[float]:
    """Seconds per whole reconstruction of ``y`` (device-synchronised; CUDA events on a GPU)."""
    model.eval()
    kwargs = {"solver": solver} if solver is not None and hasattr(model, "solver_cfg") else {}
    device = y.device
    for _ in range(warmup):
        model(y, physics, **kwargs)
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(y, physics, **kwargs)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            model(y, physics, **kwargs)
            times.append(time.perf_counter() - t0)
    return times


def run_bench(
    variants: Sequence[Variant],
    backends: dict[str, Callable[[Variant], Reconstructor]],
    test_ds: Dataset,
    acceleration: int,
    center_fraction: float,
    solver: SolverConfig | None = None,
    warmup: int = 1,
    repeats: int = 5,
    device: str = "cpu",
    on_progress: Callable[[str, int, int], None] | None = None,
) -> BenchResult:
    """Score and time every variant on every back-end; ``backends[name](variant)`` deploys one.

    Each unpruned model is also measured in PyTorch when ``torch`` is not among ``backends``: it is
    the reference of ``speedup_vs_torch``. Rows come per variant, in the order of ``backends``.
    """
    dev = torch.device(device)
    plan = []
    for v in variants:
        names = list(backends) if "torch" in backends or v.ratio > 0 else ["torch", *backends]
        plan += [(v, name, backends.get(name, lambda v: v.model)) for name in names]
    # The timing slice: the first test slice, its fastMRI mask.
    items = next(iter(_loader(test_ds, 1, shuffle=False, seed=0)))
    batch = make_batch(items, acceleration, center_fraction, eval_seeds(items))
    y, physics = batch.y.to(dev), batch.physics.to(dev)
    rows: list[BenchRow] = []
    zf = zf_ssim = None
    macs = {id(v): prior_macs(v.model, tuple(y.shape[-2:])) for v in variants}  # per variant, not per back-end
    for v, name, deploy in plan:
        if on_progress:
            on_progress(f"{v.label} r={v.ratio:g} {v.strategy or ''} on {name}", len(rows), len(plan))
        model = deploy(v).to(dev)
        res: EvalResult = evaluate(model, test_ds, acceleration, center_fraction, solver=solver)
        zf, zf_ssim = res.psnr_zero_filled, res.ssim_zero_filled
        t = time_reconstruction(model, y, physics, warmup=warmup, repeats=repeats, solver=solver)
        q1, q3 = np.percentile(t, [25, 75])
        rows.append(BenchRow(
            label=v.label, ratio=v.ratio, strategy=v.strategy, backend=name,
            params=count_parameters(v.model), macs=macs[id(v)], psnr=res.psnr, ssim=res.ssim,
            mean_iterations=res.mean_iterations, all_converged=res.all_converged,
            latency_ms=1000 * statistics.median(t), latency_iqr_ms=1000 * float(q3 - q1),
            nmse=res.nmse, psnr_sense=res.psnr_sense, ssim_sense=res.ssim_sense,
        ))
    for r in rows:  # each architecture against its own unpruned model
        base_torch = next((b for b in rows if b.label == r.label and b.ratio == 0 and b.backend == "torch"), None)
        same = next((b for b in rows if b.label == r.label and b.ratio == 0 and b.backend == r.backend), None)
        if base_torch:
            r.speedup_vs_torch = base_torch.latency_ms / r.latency_ms
        if same:
            r.speedup_same_backend = same.latency_ms / r.latency_ms
    cfg = {"acceleration": acceleration, "center_fraction": center_fraction,
           "solver": dataclasses.asdict(solver) if solver else None, "warmup": warmup, "repeats": repeats,
           "timing_slice": f"{batch.fnames[0]}:{batch.slices[0]}", "slice_shape": list(y.shape[-2:]),
           "scores": "fastMRI evaluate() vs reconstruction_rss", "coil_maps": "file" if items["smaps"] is not None
           else {"espirit": dataclasses.asdict(test_ds.estimator.params)} if hasattr(test_ds, "estimator") else None}
    return BenchResult(rows=rows, config=cfg, device=describe_device(dev), psnr_zero_filled=zf or float("nan"),
                       ssim_zero_filled=zf_ssim or float("nan"))


def prior_macs(model: Reconstructor, size: tuple[int, int]) -> int:
    """MACs of one call of every prior on one slice of ``size`` (one outer iteration's CNN cost)."""
    from .prune import count_macs

    return sum(count_macs(p, model.prior_example_input(n, *size)) for n, p in model.priors().items())


def describe_device(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


# ------------------------------------------------------------------------------------------------
COLUMNS = ["model", "ratio", "strategy", "backend", "params", "MACs", "PSNR", "SSIM", "PSNR (SENSE ref.)", "iterations",
           "latency_ms", "speedup_vs_torch", "speedup_same_backend"]


def table_rows(result: BenchResult) -> list[list[str]]:
    out = []
    for r in result.rows:
        out.append([
            r.label, f"{r.ratio:.0%}" if r.ratio else "0%", r.strategy or "-", r.backend, f"{r.params:,}",
            f"{r.macs / 1e9:.2f} G" if r.macs else "-", f"{r.psnr:.2f}", f"{r.ssim:.4f}",
            f"{r.psnr_sense:.2f}" if r.psnr_sense is not None else "-",
            f"{r.mean_iterations:.1f}" if r.mean_iterations is not None else "-",
            f"{r.latency_ms:.1f}", f"x{r.speedup_vs_torch:.2f}", f"x{r.speedup_same_backend:.2f}",
        ])
    return out


def write_results(result: BenchResult, out_dir: str | Path, stem: str = "bench") -> dict[str, Path]:
    """JSON (with config), CSV and Markdown, each written atomically."""
    out = Path(out_dir)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    write_json(paths["json"], result.as_dict())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(list(dataclasses.asdict(result.rows[0]).keys()) if result.rows else [])
    for r in result.rows:
        w.writerow(list(dataclasses.asdict(r).values()))
    write_text(paths["csv"], buf.getvalue())
    md = [f"Device: {result.device}. Config: `{json.dumps(result.config)}`. Scores: fastMRI's evaluate() against reconstruction_rss. Zero-filled (RSS) PSNR {result.psnr_zero_filled:.2f} dB.", "",
          "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    write_text(paths["md"], "\n".join(md) + "\n")
    return paths


def plot_degradation(result: BenchResult, path: str | Path, backend: str = "torch") -> Path:
    """PSNR degradation (%) against pruning ratio, one line per strategy and one panel per
    architecture (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.backend == backend]
    labels = list(dict.fromkeys(r.label for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.5), squeeze=False)
    for ax, label in zip(axes[0], labels):
        mine = [r for r in rows if r.label == label]
        base = next(r for r in mine if r.ratio == 0)
        for strategy in sorted({r.strategy for r in mine if r.strategy}):
            pts = sorted((r.ratio, 100 * (base.psnr - r.psnr) / base.psnr) for r in mine if r.strategy == strategy)
            ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], marker="o", label=strategy)
        ax.set_xlabel("per-layer pruning ratio (%)")
        ax.set_ylabel("PSNR degradation (%)")
        ax.set_title(f"{label} on {backend}: PSNR degradation vs pruning\n({base.psnr:.2f} dB unpruned)", fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_examples(variants: Sequence[Variant], test_ds: Dataset, acceleration: int, center_fraction: float,
                  path: str | Path, index: int = 0, ratio: float | None = None) -> Path:
    """One test slice of one architecture's ``variants``: reference, zero-filled, unpruned and the
    pruned variants at ``ratio`` (default: the largest), each labelled with its PSNR and its degradation against the unpruned model
    (the paper's Figures 6-8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import fastmri_crop, psnr, recon_magnitude
    from .physics import ifft2c, rss

    items = D_collate([test_ds[index]])
    batch = make_batch(items, acceleration, center_fraction, eval_seeds(items))
    ratio = ratio if ratio is not None else max(v.ratio for v in variants)
    shown = [v for v in variants if v.ratio == 0] + [v for v in variants if v.ratio == ratio and v.ratio > 0]
    # As scored: reconstruction_rss and the header-size magnitude, both in fastMRI's crop.
    def shown_pair(img):
        return fastmri_crop(batch.target, recon_magnitude(img, batch.recon_size))

    ref = shown_pair(batch.target)[0][0].numpy()
    zf = shown_pair(rss(ifft2c(batch.y), dim=1))[1][0].numpy()
    panels = [("reference", ref, None), ("zero-filled", zf, None)]
    for v in shown:
        x = shown_pair(v.model.eval()(batch.y, batch.physics))[1][0].numpy()
        name = "unpruned" if v.ratio == 0 else f"{v.ratio:g}: {v.strategy}"
        panels.append((name, x, v.ratio == 0))
    base_psnr = None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
    for ax, (name, img, is_base) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=0, vmax=ref.max())
        ax.set_title(name, fontsize=8)
        ax.axis("off")
        if name != "reference":
            p = psnr(ref[None], img[None])
            if is_base:
                base_psnr = p
            ax.text(3, 12, f"{p:.2f} dB", color="yellow", fontsize=8)
            if base_psnr is not None and not is_base and name != "zero-filled":
                ax.text(3, img.shape[0] - 6, f"{100 * (base_psnr - p) / base_psnr:+.1f} %", color="cyan", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
