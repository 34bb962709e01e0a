"""The pipeline's steps as the commands and the demo run them, each callable from Python: train,
evaluate, prune, fine-tune, export and benchmark a checkpoint, with the checks that nothing is
written onto an input or into the user's data, and the bookkeeping between steps (which runs are
finished or resumable with a recipe, how exports are named, when an existing export can be reused:
the export cache, and how checkpoints become benchmark variants). Steps tell a
:class:`~spade_deploy.progress.Reporter` what they do; they return result objects and print
nothing."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import bench as B
from .bench import Variant
from .checkpoint import load_model
from .deploy.cache import export_checkpoint, export_files, export_stems, fresh_export
from .deploy.priors import require_tensorrt
from .deploy.runtime import BACKENDS, deploy
from .distributed import is_main
from .device import require_device
from .errors import SpadeError
from .finetune import finetune_model
from .io import read_manifest, write_json
from .losses import SupervisedLoss
from .models import build_model, count_parameters
from .paths import check_out_dir, check_outputs, sha256_file
from .progress import Reporter
from .prune import check_ratio, check_widths, default_timer, prune_checkpoint, prune_to_speedup, pruned_name
from .train import RUN_FILES, evaluate, fit, recorded_config

SPLITS = ("train", "val", "test")


def same_recipe(stored: dict | None, cfg) -> bool:
    """A run's recorded training config is ``cfg`` (fine-tuning decides ``fixed_masks`` itself, and
    the contraction target where ``cfg`` leaves it to be measured)."""
    stored = recorded_config(stored, cfg)
    want = cfg.record()
    own = {"fixed_masks"} | ({"lipschitz_target"} if want.get("lipschitz_target", 0) is None else set())
    return stored is not None and {k: v for k, v in stored.items() if k not in own} == {
        k: v for k, v in want.items() if k not in own}


def _run_state(last: Path, cfg, task) -> dict | None:
    """The training state of ``last`` when it was written with recipe ``cfg`` (and ``task``'s options)."""
    if not last.exists():
        return None
    manifest = read_manifest(last)
    ts = manifest.get("train_state") or {}
    ok = same_recipe(ts.get("train_config"), cfg) and (task is None or task.same_options(manifest))
    return ts if ok else None


def finished(run: Path, cfg, task=None) -> bool:
    """``run`` holds a completed training with recipe ``cfg`` (and ``task``'s options, when given)."""
    ts = _run_state(run / "last.safetensors", cfg, task)
    return (run / "best.safetensors").exists() and ts is not None and ts.get("epoch") == cfg.epochs


def derived_from(path: Path, entry: str, parent_sha256: str) -> bool:
    """``path`` exists and its manifest's ``entry`` (``pruning``, ``finetune``) records the parent
    file whose SHA-256 is ``parent_sha256``: what the demo checks before reusing a stage's output."""
    if not path.exists():
        return False
    try:
        recorded = (read_manifest(path).get(entry) or {}).get("parent_sha256")
    except SpadeError:
        return False
    return recorded == parent_sha256


def resumable(last: Path, cfg, task=None) -> bool:
    """``last`` is an interrupted run of recipe ``cfg`` (and ``task``'s options, when given)."""
    ts = _run_state(last, cfg, task)
    return ts is not None and ts.get("epoch", 0) < cfg.epochs


# ------------------------------------------------------------------------------------------------
# Where a step may write, and what it reads.
def data_folders(root: Path | None, splits: Sequence[str] = SPLITS) -> list[Path]:
    """The user's data folders, where nothing is ever written."""
    return [root / split for split in splits] if root is not None else []


def task_split(task, root: Path | None, split: str):
    """A split of the task's data (one-line error when it is missing)."""
    if split not in SPLITS:
        raise SpadeError(f"split {split!r} is not one of: {', '.join(SPLITS)}")
    if not task.has_split(root, split):
        raise SpadeError(f"{root} has no {split}/ folder")
    return task.dataset(root, split)


def _check_json_out(json_out: Path | None, inputs, data) -> None:
    if json_out is None:
        return
    if json_out.is_dir():
        raise SpadeError(f"--json {json_out} is a folder, expected a file")
    check_outputs(files=[json_out], inputs=inputs, data=data)


# ------------------------------------------------------------------------------------------------
# Train, evaluate, prune, fine-tune.
def train_run(model: str, preset: str | None, root: Path | None, out: Path, cfg, task, resume: bool = False,
              checkpoint_seconds: float | None = 120.0, reporter: Reporter | None = None):
    """Train ``model`` (registry name, ``preset``) from scratch on ``task``'s data under ``root``
    (None: the task's embedded data) into the run folder ``out``: ``best.safetensors``,
    ``last.safetensors`` and ``history.json``. Returns the :class:`~spade_deploy.train.FitResult`."""

    reporter = reporter or Reporter()
    cfg = cfg.for_model(model)
    check_out_dir(out)
    check_outputs(files=[out / f for f in RUN_FILES], folders=[out], inputs=[root] if root else [],
                  data=data_folders(root))
    torch.manual_seed(cfg.seed)  # the initial weights, reproducibly
    net = build_model(model, preset=preset)
    train_ds, val_ds = task_split(task, root, "train"), task_split(task, root, "val")
    reporter.note(f"Training {model} ({count_parameters(net):,} parameters) on {len(train_ds)} samples, "
                  f"validating on {len(val_ds)}.")
    t0 = time.perf_counter()
    with reporter.progress("epoch 1") as update:
        last: dict = {}

        def on_step(label, step, n, loss):
            update(step, n, description=label,
                   info=f"loss {loss:.4f}" + (f" | val PSNR {last['val_psnr']:.2f} dB" if "val_psnr" in last else ""))

        def on_epoch(rec):
            last.update(rec)
            reporter.note(
                f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f}"
                + (f", val PSNR {rec['val_psnr']:.2f} dB, SSIM {rec['val_ssim']:.4f}" if "val_psnr" in rec else "")
                + (f", {rec['val_iterations']:.1f} iterations" if rec.get("val_iterations") else "")
                + (" (some slices hit the cap)" if rec.get("val_converged") is False else "")
            )

        result = fit(net, SupervisedLoss(), train_ds, val_ds, cfg, out, resume=resume,
                     extra_manifest={"data": str(root) if root else "embedded", "preset": preset,
                                     "dataset": task.dataset_key(root)},
                     on_step=on_step, on_epoch=on_epoch, checkpoint_seconds=checkpoint_seconds, task=task)
    if is_main():  # one job over torchrun's processes: rank 0 writes its files
        write_json(Path(out) / "history.json", {"train_config": cfg.record(), "history": result.history})
    reporter.note(f"best checkpoint: {result.best_path} (val PSNR {result.best_val_psnr:.2f} dB) "
                  f"in {time.perf_counter() - t0:.0f} s")
    return result


@dataclass
class Evaluation:
    """A checkpoint's scores on a split of its task's data (:meth:`Task.evaluate`)."""

    checkpoint: Path
    split: str
    task: Any
    scores: Any
    manifest: dict
    solver: Any = None  # the stopping rule used, for models with a solver

    @property
    def model(self) -> str:
        return self.manifest["model"]


def evaluate_checkpoint(checkpoint: Path, task, root: Path | None, split: str = "test", json_out: Path | None = None,
                        batch_size: int = 4, solver_changes: dict | None = None,
                        reporter: Reporter | None = None) -> Evaluation:
    """Score ``checkpoint`` on ``split`` of ``task``'s data; ``solver_changes`` (``max_iter``,
    ``tol``, ``method``) override the stopping rule of a model with a solver; ``json_out``: also
    write the scores there, with the checkpoint, split, task and stopping rule."""
    reporter = reporter or Reporter()
    _check_json_out(json_out, inputs=[checkpoint, root], data=data_folders(root))
    net, manifest = load_model(checkpoint)
    task.check_model(net, checkpoint)
    solver_cfg = None
    if net.solver_cfg is not None:
        changes = {k: v for k, v in (solver_changes or {}).items() if v is not None}
        try:
            solver_cfg = dataclasses.replace(net.solver_cfg, **changes)
        except (ValueError, SpadeError) as exc:
            raise SpadeError(str(exc)) from None
    ds = task_split(task, root, split)
    with reporter.progress(f"evaluating {split}", transient=True) as update:
        scores = evaluate(net, ds, task, solver=solver_cfg, batch_size=batch_size, on_batch=lambda i, n: update(i, n))
    if json_out is not None:
        write_json(json_out, {"checkpoint": str(checkpoint), "split": split, "task": task.record(),
                              "solver": dataclasses.asdict(solver_cfg) if solver_cfg else None, **scores.as_dict()})
    return Evaluation(Path(checkpoint), split, task, scores, manifest, solver_cfg)


def prune_run(checkpoint: Path, ratios: Sequence[float], out: Path, round_to=None, target_speedup: float | None = None,
              size: tuple[int, int] = (160, 160), device: str | None = None,
              reporter: Reporter | None = None) -> list[tuple[Path, Any]]:
    """SPADE-prune ``checkpoint`` at each ratio (or at the ratio reaching ``target_speedup``,
    measured) into ``out``: ``[(path, PruneReport)]``."""
    reporter = reporter or Reporter()
    round_to = check_widths(round_to)
    if target_speedup is not None and ratios:
        raise SpadeError("give either --ratio or --target-speedup, not both")
    if target_speedup is None:
        ratios = [check_ratio(r) for r in ratios]
    names = ([pruned_name(checkpoint.stem, r, round_to) for r in ratios] if target_speedup is None
             else [pruned_name(checkpoint.stem, 0.0, round_to, target_speedup)])
    check_out_dir(out)
    check_outputs(files=[out / n for n in names], folders=[out], inputs=[checkpoint])
    timer = default_timer(device) if (round_to == "auto" or target_speedup is not None) else None
    if target_speedup is not None:
        with reporter.progress(f"searching the ratio for x{target_speedup:g} measured on {timer.device}", transient=True):
            return [prune_to_speedup(checkpoint, target_speedup, out, round_to, timer=timer, size=size)]
    return prune_checkpoint(checkpoint, list(ratios), out, round_to, timer=timer, measure_size=size)


def finetune_run(checkpoint: Path, strategy: str, teacher: Path | None, root: Path | None, out: Path, cfg, task,
                 resume: bool = False, checkpoint_seconds: float | None = 120.0, reporter: Reporter | None = None):
    """Fine-tune the pruned ``checkpoint`` with ``strategy`` into the run folder ``out``
    (:func:`~spade_deploy.finetune.finetune_model`). Returns the ``FitResult``."""
    reporter = reporter or Reporter()
    check_out_dir(out)
    check_outputs(files=[out / f for f in RUN_FILES], folders=[out], inputs=[checkpoint, teacher, root],
                  data=data_folders(root))
    with reporter.progress(f"{strategy} fine-tuning") as update:
        def on_step(label, step, n, loss):
            update(step, n, description=f"{strategy} {label}", info=f"loss {loss:.4f}")

        def on_epoch(rec):
            if "val_psnr" in rec:
                reporter.note(f"epoch {rec['epoch']}: loss {rec['train_loss']:.4f}, val PSNR {rec['val_psnr']:.2f} dB")

        result = finetune_model(checkpoint, strategy, root, out, cfg, teacher_path=teacher, resume=resume,
                                on_step=on_step, on_epoch=on_epoch, checkpoint_seconds=checkpoint_seconds, task=task)
    reporter.note(f"fine-tuned ({strategy}): {result.best_path}")
    c = read_manifest(result.best_path).get("contraction")
    if c:
        where = (f"measured on the unpruned parent {c['parent']} (median over {len(c['norms'])} slices, max {c['max']:.4f})"
                 if c.get("source") == "parent" else "given")
        reporter.note(f"contraction target ||J_T|| <= {c['target']:.4f}, {where}")
    return result


# ------------------------------------------------------------------------------------------------
# Benchmark.
def bench_variant(path: Path):
    """``(Variant, manifest)`` of a checkpoint: the unpruned model (ratio 0) or a pruned one, with
    its fine-tuning strategy ("none" when pruned and not fine-tuned) and how its widths were chosen."""
    net, man = load_model(path)
    pruning, ft = man.get("pruning") or {}, man.get("finetune") or {}
    return Variant(label=man["model"], ratio=float(pruning.get("ratio", 0.0)),
                   strategy=ft.get("strategy") or ("none" if pruning else None), model=net,
                   widths=(pruning.get("widths") or "paper") if pruning else None), man


@dataclass
class BenchRun:
    """A benchmark of checkpoints: its result, the variants it measured and the files written."""

    result: Any  # bench.BenchResult
    variants: list
    paths: dict[str, Path] = field(default_factory=dict)
    split: str = "test"
    task_options: dict = field(default_factory=dict)  # Task.options() of the data it ran on


def bench_checkpoints(checkpoints: Sequence[Path], backends: Sequence[str], engines: Path, root: Path | None,
                      split: str, task, repeats: int, warmup: int, device: str, out: Path, stem: str = "bench",
                      reporter: Reporter | None = None, time_unfinetuned: bool = True,
                      notes: Sequence[str] = ()) -> BenchRun:
    """Score and time the unpruned model and its pruned / fine-tuned variants on every back-end
    (:func:`~spade_deploy.bench.run_bench`), exporting the priors into ``engines`` where no intact
    export of a checkpoint is there; write ``<stem>.json / .csv / .md`` and the figures into ``out``.

    Every check (back-ends, device, outputs, existing exports, the split) runs before anything is
    written. ``time_unfinetuned=False``: pruned models not fine-tuned are scored, not timed.
    ``notes``: lines the result files carry (the demo's pruned models left out, and why)."""
    reporter = reporter or Reporter()
    backends = list(backends)
    for b in backends:
        if b not in BACKENDS:
            raise SpadeError(f"unknown back-end {b!r}; choose from {', '.join(BACKENDS)}")
    dev = require_device(device)
    if "tensorrt" in backends:
        if dev.type != "cuda":
            raise SpadeError("-b tensorrt runs on a CUDA GPU: add --device cuda")
        require_tensorrt()
    check_out_dir(out)
    check_out_dir(engines)
    results = [out / f"{stem}.{ext}" for ext in ("json", "csv", "md")] + [out / f"{stem}-degradation.png"]
    check_outputs(files=results, folders=[out, engines], inputs=[*checkpoints, root], data=data_folders(root))
    test_ds = task_split(task, root, split)  # a missing split fails before any export is written
    trt_size = task.prior_size(test_ds) if "tensorrt" in backends else None
    variants, manifests, hashes, to_export = [], {}, {}, []
    stems = export_stems(list(checkpoints))
    for path in checkpoints:
        variant, man = bench_variant(path)
        task.check_model(variant.model, path)
        variant.timed = time_unfinetuned or variant.strategy != "none"
        net, label = variant.model, variant.label
        if not man.get("pruning") and any(v.label == label and v.ratio == 0 for v in variants):
            raise SpadeError(f"two unpruned {label!r} models given; bench one unpruned model per architecture")
        variants.append(variant)
        check_outputs(files=[out / f"{stem}-{label}-examples.png"], inputs=checkpoints)
        if any(b != "torch" for b in backends):
            # Read and check every existing export before anything is written.
            hashes[id(net)] = sha256_file(path)
            check_outputs(files=export_files(net, engines, stems[path]), inputs=checkpoints)
            fresh = fresh_export(net, hashes[id(net)], engines, stems[path], backends, size=trt_size)
            if fresh is None:
                to_export.append((path, net))
            else:
                manifests[id(net)] = fresh
    for label in {v.label for v in variants}:
        if not any(v.label == label and v.ratio == 0 for v in variants):
            raise SpadeError(f"bench needs the unpruned {label!r} among the checkpoints (speed-ups are relative to it)")
    for path, net in to_export:
        manifests[id(net)] = export_checkpoint(path, engines, trt="tensorrt" in backends, stem=stems[path],
                                               size=trt_size).manifest_path
    deployers = {b: (lambda v, sample, b=b: deploy(v.model, b, manifests.get(id(v.model)), device, sample=sample,
                                                   checkpoint_sha256=hashes.get(id(v.model))))
                 for b in backends}
    with reporter.progress("benchmarking", transient=True) as update:
        result = B.run_bench(variants, deployers, test_ds, task, repeats=repeats, warmup=warmup, device=device,
                             on_progress=lambda what, i, n: update(i, n, description=what))
    result.notes = [*notes, *B.buys_nothing(result)]
    paths = B.write_results(result, out, stem)
    if any(v.strategy for v in variants):
        paths["degradation"] = B.plot_degradation(result, out / f"{stem}-degradation.png", backend=backends[0])
        for label in dict.fromkeys(v.label for v in variants):
            mine = [v for v in variants if v.label == label]
            if any(v.ratio > 0 for v in mine):
                paths[f"examples {label}"] = B.plot_examples(mine, test_ds, task, out / f"{stem}-{label}-examples.png")
    return BenchRun(result, variants, paths, split, task.options())


__all__ = ["SPLITS", "same_recipe", "finished", "resumable", "data_folders", "task_split",
           "train_run", "Evaluation", "evaluate_checkpoint", "prune_run", "finetune_run", "bench_variant",
           "BenchRun", "bench_checkpoints"]
