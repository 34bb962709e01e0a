"""SPADE fine-tuning: the three strategies of the paper over the one trainer.

* supervised — ground truth of the training split (eq. 7);
* school — the unpruned model as teacher, on the test measurements (eq. 8);
* self-supervised — only the test measurements: data fidelity + equivariant imaging (eq. 9).

A pruned DEQ must converge at least as fast as the model it came from, so unless the user sets it,
the bound of the convergence penalty (``DEQTrainOptions.lipschitz_target``, in
``TrainConfig.model_options``) is measured on the unpruned
parent: the median over the fine-tuning data of its whole-iteration Jacobian norm ``||J_T(x*)||``
at its own fixed points (:func:`measure_contraction`), by the estimator the penalty itself uses.
The median, not the maximum: the penalty is a per-slice hinge, so slices the parent itself ran
slowly are pulled down to its typical rate rather than licensing every slice to run as slowly.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import is_pruned, load_model
from .errors import SpadeError
from .io import read_manifest
from .losses import STRATEGIES
from .models import Reconstructor
from .paths import sha256_file
from .tasks import Task, task_for
from .train import FitResult, TrainConfig, fit


def measure_contraction(
    model: Reconstructor, dataset, cfg: TrainConfig, max_slices: int = 8, task: Task | None = None
) -> dict | None:
    """``||J_T(x*)||`` of ``model`` at its own fixed points (inference solver) on the first
    ``max_slices`` samples of ``dataset``, measured as evaluation measures them (``task``; default
    the model's own): ``{"median", "max", "norms", "mean_iterations"}``;
    ``None`` for models that are not fixed points."""
    task = task if task is not None else task_for(model)
    model.eval()
    norms, iters = [], []
    for items in task.loader(dataset, cfg.batch_size, shuffle=False, seed=0):
        batch = task.eval_batch(items)
        with torch.no_grad():
            x = model(batch.y, batch.physics)
        got = model.contraction_norms(batch, x)
        if got is None:
            return None
        norms += got.tolist()
        info = model.solve_info()
        if info is not None:
            iters += info.iterations.tolist()
        if len(norms) >= max_slices:
            break
    if not norms:
        raise SpadeError("no slices to measure the parent model's contraction on")
    norms = norms[:max_slices]
    return {"median": statistics.median(norms), "max": max(norms), "norms": [round(n, 5) for n in norms],
            "mean_iterations": statistics.fmean(iters[: len(norms)]) if iters else None}


def finetune_model(
    checkpoint: str | Path,
    strategy: str,
    data_root: str | Path | None,
    out_dir: str | Path,
    cfg: TrainConfig,
    teacher_path: str | Path | None = None,
    resume: bool = False,
    on_step: Callable | None = None,
    on_epoch: Callable | None = None,
    checkpoint_seconds: float | None = 120.0,
    task: Task | None = None,
) -> FitResult:
    """Fine-tune ``checkpoint`` with ``strategy`` on the data under ``data_root`` (the task's
    splits: supervised on train, school and self-supervised on test; val when present, for
    keeping the best epoch). ``task``: the model's own when not given."""
    if strategy not in STRATEGIES:
        raise SpadeError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    loss = STRATEGIES[strategy]()
    model, manifest = load_model(checkpoint)
    if task is None:
        task = task_for(model)
    task.check_model(model, checkpoint)
    root = task.data_root(Path(data_root) if data_root is not None else None)

    teacher = None
    if loss.needs_teacher:
        teacher_path = teacher_path or (manifest.get("pruning") or {}).get("parent")
        if not teacher_path:
            raise SpadeError("school fine-tuning needs --teacher (the unpruned model)")
        teacher, t_manifest = load_model(teacher_path)
        if t_manifest.get("model") != manifest.get("model") or t_manifest.get("config") != manifest.get("config"):
            raise SpadeError(
                f"teacher {teacher_path} is a {t_manifest.get('model')!r} of another architecture than the student "
                f"({manifest.get('model')!r}); use the unpruned model the student was pruned from"
            )
        if is_pruned(t_manifest):
            raise SpadeError(f"teacher {teacher_path} is itself pruned; use the unpruned model")

    # supervised learns from the training split's ground truth; school and self-supervised from
    # the test measurements as acquired (fixed masks), which need no ground truth.
    split = "train" if loss.needs_ground_truth else "test"
    train_ds = task.dataset(root, split)
    if loss.needs_ground_truth:
        task.check_ground_truth(train_ds, f"strategy {strategy!r}", root / split if root else split)
    val_ds = task.dataset(root, "val") if task.has_split(root, "val") else None
    if val_ds is not None and not task.has_ground_truth(val_ds):
        val_ds = None
    cfg = dataclasses.replace(cfg, fixed_masks=not loss.needs_ground_truth).for_model(model.registry_name)
    if teacher is not None:
        loss.share((sha256_file(teacher_path), task.name, json.dumps(task.options(), sort_keys=True, default=str),
                    str(Path(root, split).resolve()) if root else f"embedded {split}"))
    contraction = None
    measurable = type(model).contraction_norms is not Reconstructor.contraction_norms
    options = cfg.model_options  # a fixed-point model's: its penalty on the whole iteration, bounded
    if measurable and options is not None and options.lipschitz_weight > 0 and options.lipschitz_on == "operator":
        contraction = _contraction_target(model, manifest, teacher, teacher_path, train_ds, cfg, Path(out_dir), resume,
                                          task)
        cfg = dataclasses.replace(cfg, model_options=dataclasses.replace(options, lipschitz_target=contraction["target"]))
    extra = {
        "pruning": manifest.get("pruning"),
        "finetune": {"strategy": strategy, "parent": str(checkpoint), "parent_sha256": sha256_file(checkpoint),
                     "teacher": str(teacher_path) if teacher else None,
                     "data": str(root / split) if root else f"embedded {split}"},
        "contraction": contraction,
    }
    return fit(model, loss, train_ds, val_ds, cfg, out_dir, resume=resume, teacher=teacher,
               extra_manifest=extra, on_step=on_step, on_epoch=on_epoch,
               checkpoint_seconds=checkpoint_seconds, task=task)


# The parent's measurement per (parent file, data, masks): ``spade demo`` fine-tunes one parent's
# pruned models 12 times on two splits, and measures twice instead of twelve times.
_MEASURED: dict[tuple, dict | None] = {}


def _contraction_target(model, manifest, teacher, teacher_path, train_ds, cfg: TrainConfig, out: Path, resume: bool,
                        task: Task) -> dict:
    """The penalty's bound and where it came from: the user's, the interrupted run's (``--resume``
    continues with the value it started with) or measured on the unpruned parent."""
    if cfg.model_options.lipschitz_target is not None:
        return {"target": cfg.model_options.lipschitz_target, "source": "user"}
    last = out / "last.safetensors"
    if resume and last.exists():
        previous = read_manifest(last)
        target = ((previous.get("train_state") or {}).get("train_config") or {}).get("lipschitz_target")
        if target is not None:
            return {**(previous.get("contraction") or {}), "target": target}
    parent_path = (manifest.get("pruning") or {}).get("parent")
    if teacher is not None and (not parent_path or Path(str(teacher_path)) == Path(parent_path)):
        parent, parent_path = teacher, teacher_path
    elif not parent_path:
        raise SpadeError("the checkpoint records no unpruned parent to measure the contraction target on; "
                         "give --lipschitz-target")
    elif not Path(parent_path).exists():
        raise SpadeError(f"the unpruned parent {parent_path} (recorded when pruning) is missing, so the contraction "
                         "target cannot be measured on it; give --lipschitz-target")
    else:
        parent = None
    key = (str(Path(parent_path).resolve()), Path(parent_path).stat().st_mtime_ns if Path(parent_path).exists() else None,
           str(Path(train_ds.root).resolve()) if hasattr(train_ds, "root") else id(train_ds),
           task.name, tuple(sorted(task.options().items())))
    measured = _MEASURED.get(key)
    if measured is None:
        if parent is None:
            parent = load_model(parent_path)[0]
        measured = _MEASURED[key] = measure_contraction(parent, train_ds, cfg, task=task)
    if measured is None:
        raise SpadeError(f"the parent {parent_path} is not a fixed-point model; give --lipschitz-target")
    return {"target": measured["median"], "source": "parent", "parent": str(parent_path), **measured}
