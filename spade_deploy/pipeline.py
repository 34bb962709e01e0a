"""The pipeline's bookkeeping shared by the commands and the demo: which runs are finished or
resumable with a recipe, how exports are named and when an existing export can be reused (the
export cache), and how a checkpoint becomes a benchmark variant."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .errors import SpadeError


def same_recipe(stored: dict | None, cfg) -> bool:
    """A run's recorded training config is ``cfg`` (fine-tuning decides ``fixed_masks`` itself, and
    the contraction target where ``cfg`` leaves it to be measured)."""
    want = dataclasses.asdict(cfg)
    own = {"fixed_masks"} | ({"lipschitz_target"} if cfg.lipschitz_target is None else set())
    return stored is not None and {k: v for k, v in stored.items() if k not in own} == {
        k: v for k, v in want.items() if k not in own}


def finished(run: Path, cfg) -> bool:
    """``run`` holds a completed training with recipe ``cfg``."""
    from .io import read_manifest

    best, last = run / "best.safetensors", run / "last.safetensors"
    if not (best.exists() and last.exists()):
        return False
    ts = read_manifest(last).get("train_state") or {}
    return same_recipe(ts.get("train_config"), cfg) and ts.get("epoch") == cfg.epochs


def resumable(last: Path, cfg) -> bool:
    """``last`` is an interrupted run of recipe ``cfg``."""
    from .io import read_manifest

    if not last.exists():
        return False
    ts = read_manifest(last).get("train_state") or {}
    return same_recipe(ts.get("train_config"), cfg) and ts.get("epoch", 0) < cfg.epochs


def export_stem(checkpoint: Path) -> str:
    """Run folders hold files named best.safetensors: name exports after folder and file."""
    return f"{checkpoint.parent.name}.{checkpoint.stem}" if checkpoint.stem in ("best", "last") else checkpoint.stem


def export_stems(checkpoints: list[Path]) -> dict[Path, str]:
    """Distinct export names for checkpoints benchmarked together: :func:`export_stem`, and for
    checkpoints whose names clash, their path below the clashing ones' common folder (the demo's
    ``<out>/varnet/base/best`` and ``<out>/e2e-varnet/base/best`` -> ``varnet.base.best``,
    ``e2e-varnet.base.best``; one name for two would make one model's priors replace the other's).
    The same file named twice keeps one name."""
    stems = {path: export_stem(path) for path in dict.fromkeys(checkpoints)}
    files = {stem: {p.resolve() for p in stems if stems[p] == stem} for stem in set(stems.values())}
    clashing = [p for p in stems if len(files[stems[p]]) > 1]
    if clashing:
        root = Path(os.path.commonpath([p.resolve().parent for p in clashing]))
        for path in clashing:
            stems[path] = ".".join(path.resolve().relative_to(root).with_suffix("").parts)
    return stems


def fresh_export(net, checkpoint_sha256: str, engines: Path, stem: str, backends, size=None) -> Path | None:
    """The manifest ``engines/<stem>.manifest.json`` when it is an export of exactly this checkpoint
    (same SHA-256) with every file the back-ends need intact; None when there is none or it was
    exported from another version of the checkpoint (export again). A manifest that is malformed,
    or whose files differ from the ones it records, is an error: it is never silently replaced."""
    from .export import read_export_manifest
    from .runtime import verify_export

    mpath = engines / f"{stem}.manifest.json"
    if not mpath.exists():
        return None
    man = read_export_manifest(mpath)
    if man.get("checkpoint_sha256") != checkpoint_sha256:
        return None
    if "tensorrt" in backends and not all(p.get("engine") and p.get("engine_image_size") == list(size or ())
                                          for p in man["priors"]):
        return None
    for b in backends:
        if b != "torch":
            verify_export(net, "onnxruntime" if b == "auto" else b, mpath, checkpoint_sha256)
    return mpath


def export_files(net, out: Path, stem: str) -> list[Path]:
    return [out / f"{stem}.manifest.json", *(out / f"{stem}.{name}.onnx" for name in net.priors())]


def bench_variant(path: Path):
    """``(Variant, manifest)`` of a checkpoint: the unpruned model (ratio 0) or a pruned one, with
    its fine-tuning strategy ("none" when pruned and not fine-tuned) and how its widths were chosen."""
    from .bench import Variant
    from .checkpoint import load_model

    net, man = load_model(path)
    pruning, ft = man.get("pruning") or {}, man.get("finetune") or {}
    return Variant(label=man["model"], ratio=float(pruning.get("ratio", 0.0)),
                   strategy=ft.get("strategy") or ("none" if pruning else None), model=net,
                   widths=(pruning.get("widths") or "paper") if pruning else None), man


__all__ = ["same_recipe", "finished", "resumable", "export_stem", "export_stems", "fresh_export", "export_files",
           "bench_variant", "SpadeError"]
