"""``spade demo``: the whole SPADE pipeline on the embedded data, per architecture.

For each model: train the base (or reuse a finished run, or the base shipped for this dataset),
score it on the test split, prune it at the recipe's ratios with the paper's widths (kept for
reproduction) and with the widths measured fastest here (``--round-to auto``), fine-tune every
pruned model with every strategy, except measured widths that buy nothing on this device (every
group kept whole, or priors less than 3 % faster: said in the output and in the result files); then one export + bench
per task over the base, the fine-tuned models and, scored but not timed, the models pruned at the
largest ratio before fine-tuning (what fine-tuning recovers, where pruning costs most; unless the
recipe leaves them out). Finished stages with the same recipe are
reused and interrupted ones resumed, so a second run only benches; a pruned model or a fine-tuning
run is reused only when its manifest records the exact bytes (SHA-256) of the file it was made
from (hardware-aware widths are not measured anew under runs made from the old ones). The recipes
are the models' own (:attr:`~spade_deploy.models.ModelEntry.demo`, :func:`demo_recipes`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import SpadeError
from .pipeline import BenchRun, Evaluation, bench_checkpoints, derived_from, evaluate_checkpoint, finetune_run, \
    finished, prune_run, resumable, train_run
from .io import read_manifest
from .losses import STRATEGIES
from .models import DemoRecipe, bundled_base, get_entry, model_names
from .paths import sha256_file
from .progress import Reporter
from .prune import PAPER_RATIOS, pruned_name
from .tasks import task_class


class DemoReporter(Reporter):
    """What the demo reports besides progress: each stage's result as it comes (does nothing here;
    ``spade demo`` prints the tables the single commands print)."""

    def evaluated(self, evaluation: Evaluation) -> None:
        """The base model's scores on the test split."""

    def pruned(self, checkpoint: Path, results: list, size: tuple[int, int]) -> None:
        """``[(path, PruneReport)]`` of one pruning call of ``checkpoint``; ``size``: the input size
        hardware-aware widths were measured at."""

    def benched(self, run: BenchRun) -> None:
        """One task's benchmark."""


@dataclass
class DemoModel:
    """What the demo made for one architecture."""

    name: str
    task: str
    base: Path
    evaluation: Evaluation
    pruned: list[Path] = field(default_factory=list)
    finetuned: list[Path] = field(default_factory=list)
    idle: list[str] = field(default_factory=list)  # pruned models not fine-tuned: why (buys nothing here)


@dataclass
class DemoResult:
    models: list[DemoModel]
    benches: dict[str, BenchRun]  # task name -> its bench
    seconds: float
    results: Path  # the folder of the bench results


def train_once(model: str, preset: str, root: Path | None, run: Path, cfg, task, retrain: bool = False,
               reporter: Reporter | None = None) -> Path:
    """The base model's checkpoint: a finished run in ``run`` with this recipe, else the base
    shipped with the package for this dataset, else trained now (an interrupted run resumed)."""
    reporter = reporter or Reporter()
    best = run / "best.safetensors"
    if not retrain and finished(run, cfg, task) and read_manifest(best).get("preset") == preset:
        reporter.note(f"Reusing the trained base model {best} (--retrain to train again).")
        return best
    shipped = None if retrain else bundled_base(model, preset, task.dataset_key(root))
    if shipped is not None:
        reporter.note(f"Using the base model trained on this dataset and shipped with spade-deploy: {shipped} "
                      "(--retrain to train it here).")
        return shipped
    resume = not retrain and resumable(run / "last.safetensors", cfg, task)
    train_run(model, preset, root, run, cfg, task, resume=resume, reporter=reporter)
    return best


def demo_recipes() -> dict[str, DemoRecipe]:
    """The demo recipe of every registered model that has one (:attr:`ModelEntry.demo`)."""
    return {n: get_entry(n).demo for n in model_names() if get_entry(n).demo is not None}


def run_demo(out: Path, models: Sequence[str] = ("deq",), retrain: bool = False, backends: Sequence[str] = ("auto",),
             repeats: int = 2, reporter: DemoReporter | None = None, recipes: dict | None = None,
             data: dict[str, Path] | None = None, device: str = "cpu") -> DemoResult:
    """Run the demo for ``models`` into ``out`` (``<out>/<model>/{base,pruned,finetuned}``,
    ``<out>/engines``, ``<out>/results``). ``recipes``: name -> :class:`~spade_deploy.models.DemoRecipe`
    (default the shipped ones); ``data``: task name -> a data root to use instead of the task's
    embedded data."""
    reporter = reporter or DemoReporter()
    recipes = demo_recipes() if recipes is None else recipes
    names = list(dict.fromkeys(models))
    for name in names:
        if name not in recipes:
            raise SpadeError(f"no demo recipe for {name!r}; choose from {', '.join(recipes)}")
    t0 = time.perf_counter()
    made: list[DemoModel] = []
    groups: dict[str, tuple] = {}  # task -> (task, data root, checkpoints): one bench per task
    for name in names:
        recipe = recipes[name]
        task_name = get_entry(name).task
        given = (data or {}).get(task_name)
        task = task_class(task_name).from_cli(given, dict(recipe.task_options))
        root = task.data_root(given, reporter)
        base_dir = out / name
        reporter.stage(f"{name}: train ({recipe.preset} preset)")
        best = train_once(name, recipe.preset, root, base_dir / "base", recipe.train, task, retrain, reporter)
        evaluation = evaluate_checkpoint(best, task, root, "test", json_out=base_dir / "eval-test.json",
                                         reporter=reporter)
        reporter.evaluated(evaluation)
        reporter.stage(f"{name}: SPADE prune")
        ratios = list(recipe.ratios or PAPER_RATIOS)
        calls = [dict(ratios=ratios)]
        size = task.prior_size(task.dataset(root, "test"))  # what the priors see on the test data
        if recipe.hardware_widths:
            # ... and with the widths this device runs fastest (--round-to auto).
            calls.append(dict(ratios=list(recipe.hardware_ratios or ratios), round_to="auto", size=size))
        pruned = []
        idle = []  # measured widths that buy nothing here: not fine-tuned, not benched
        untuned = []  # scored as pruned, before fine-tuning: the largest ratio only (the headline)
        best_sha = sha256_file(best)
        for call in calls:
            paths = [base_dir / "pruned" / pruned_name(best.stem, r, call.get("round_to")) for r in call["ratios"]]
            if not retrain and all(derived_from(p, "pruning", best_sha) for p in paths):
                # Pruned from this very base: hardware-aware widths are not measured again.
                reporter.note(f"Reusing the pruned models {', '.join(p.name for p in paths)} "
                              "(--retrain to prune again).")
                verdicts = [(read_manifest(p).get("pruning") or {}).get("hardware", {}).get("buys_nothing")
                            and f"ratio {r:g} buys nothing on this device (measured when pruned)"
                            for p, r in zip(paths, call["ratios"])]
            else:
                results = prune_run(best, out=base_dir / "pruned", reporter=reporter, **call)
                reporter.pruned(best, results, size)
                paths = [p for p, _ in results]
                verdicts = [rep.verdict() for _, rep in results]
            for path, r, verdict in zip(paths, call["ratios"], verdicts):
                if verdict:
                    idle.append(f"{path.name}: {verdict}; not fine-tuned")
                    reporter.note(idle[-1])
                    continue
                pruned.append(path)
                if recipe.score_unfinetuned and r == max(ratios):
                    untuned.append(path)
        reporter.stage(f"{name}: SPADE fine-tune")
        tuned = []
        for path in pruned:
            path_sha = sha256_file(path)
            for strategy in STRATEGIES:
                ft_out = base_dir / "finetuned" / f"{path.stem}.{strategy}"
                ft_cfg = recipe.finetune[strategy]
                # A run of another pruned model (pruned again since) is not continued.
                fresh = retrain or not derived_from(ft_out / "last.safetensors", "finetune", path_sha)
                if fresh or not finished(ft_out, ft_cfg, task):
                    resume = not fresh and resumable(ft_out / "last.safetensors", ft_cfg, task)
                    finetune_run(path, strategy, best, root, ft_out, ft_cfg, task, resume=resume, reporter=reporter)
                tuned.append(ft_out / "best.safetensors")
        made.append(DemoModel(name, task_name, best, evaluation, pruned, tuned, idle))
        group = groups.setdefault(task_name, (task, root, []))
        group[2].extend([best, *untuned, *tuned])
    benches = {}
    for task_name, (task, root, checkpoints) in groups.items():
        mine = [m.name for m in made if m.task == task_name]
        reporter.stage("SPADE: export + bench" + (f" ({task_name})" if len(groups) > 1 else ""))
        benches[task_name] = bench_checkpoints(checkpoints, list(backends), out / "engines", root, "test", task,
                                               repeats=repeats, warmup=1, device=device, out=out / "results",
                                               stem="bench-" + "+".join(mine), reporter=reporter,
                                               time_unfinetuned=False,  # pruned, not fine-tuned: not deployed
                                               notes=[f"{m.name}: {why}" for m in made if m.task == task_name
                                                      for why in m.idle])
        reporter.benched(benches[task_name])
    return DemoResult(made, benches, time.perf_counter() - t0, out / "results")


__all__ = ["run_demo", "demo_recipes", "train_once", "DemoReporter", "DemoResult", "DemoModel"]
