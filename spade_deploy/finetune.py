"""SPADE fine-tuning: the three strategies of the paper over the one trainer.

* supervised — ground truth of the training split (eq. 7);
* school — the unpruned model as teacher, on the test measurements (eq. 8);
* self-supervised — only the test measurements: data fidelity + equivariant imaging (eq. 9).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from . import data as D
from .checkpoint import is_pruned, load_model
from .errors import SpadeError
from .losses import STRATEGIES
from .train import FitResult, TrainConfig, fit


def finetune_model(
    checkpoint: str | Path,
    strategy: str,
    data_root: str | Path,
    out_dir: str | Path,
    cfg: TrainConfig,
    teacher_path: str | Path | None = None,
    resume: bool = False,
    on_step: Callable | None = None,
    on_epoch: Callable | None = None,
    checkpoint_seconds: float | None = 120.0,
) -> FitResult:
    if strategy not in STRATEGIES:
        raise SpadeError(f"unknown strategy {strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    loss = STRATEGIES[strategy]()
    model, manifest = load_model(checkpoint)
    root = Path(data_root)

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
    train_ds = D.SliceDataset(root / split)
    if loss.needs_ground_truth and not train_ds.has_ground_truth:
        raise SpadeError(f"strategy {strategy!r} needs ground truth, but {root / split} has no reconstruction_rss")
    val_ds = D.SliceDataset(root / "val") if (root / "val").exists() else None
    if val_ds is not None and not val_ds.has_ground_truth:
        val_ds = None
    cfg = dataclasses.replace(cfg, fixed_masks=not loss.needs_ground_truth)
    extra = {
        "pruning": manifest.get("pruning"),
        "finetune": {"strategy": strategy, "parent": str(checkpoint), "teacher": str(teacher_path) if teacher else None, "data": str(root / split)},
    }
    return fit(model, loss, train_ds, val_ds, cfg, out_dir, resume=resume, teacher=teacher,
               extra_manifest=extra, on_step=on_step, on_epoch=on_epoch, checkpoint_seconds=checkpoint_seconds)
