"""What a tighter convergence bound buys a pruned DEQ: fine-tune the demo's pruned models with the
demo's recipe, once with the bound measured on the unpruned parent (``spade finetune``'s default,
the demo's fine-tuned models) and once with that bound lowered by ``--offset``, and score both on
the test split (fastMRI's PSNR, mean iterations under the inference solver).

    python benchmarks/contraction_target.py [--run runs/demo] [--ratio 0.2 --ratio 0.4] [--offset 0.02]

Fewer iterations speed up the whole reconstruction by the same factor, but the bound limits what
the prior may learn: the table shows what each strategy pays for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
from pathlib import Path

import torch

from spade_deploy.mri import simulate
from spade_deploy.checkpoint import load_model
from spade_deploy.errors import SpadeError
from spade_deploy.finetune import finetune_model
from spade_deploy.io import read_manifest, write_text
from spade_deploy.losses import STRATEGIES
from spade_deploy.paths import check_outputs
from spade_deploy.prune import pruned_name
from spade_deploy.mri.task import MRITask
from spade_deploy.models import get_entry
from spade_deploy.train import evaluate


def main() -> None:
    from spade_deploy.hostmem import keep_freed_memory

    keep_freed_memory()  # as the spade command runs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="the demo's --out folder")
    ap.add_argument("--ratio", type=float, action="append", default=None, help="pruning ratio (repeatable; default 0.2 0.4)")
    ap.add_argument("--strategy", action="append", default=None, help="repeatable; default all three")
    ap.add_argument("--offset", type=float, default=0.02, help="how far below the parent's norm the bound goes")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/contraction-target-cpu.md"))
    args = ap.parse_args()
    try:
        run(args)
    except SpadeError as exc:
        raise SystemExit(f"error: {exc}") from None


def run(args) -> None:
    ratios = args.ratio or [0.2, 0.4]
    strategies = args.strategy or list(STRATEGIES)
    root = simulate.default_data_root()
    task = MRITask()
    test = task.dataset(root, "test")
    recipe = get_entry("deq").demo
    pruned = {r: args.run / "deq" / "pruned" / pruned_name("deq-small", r) for r in ratios}
    tuned = {(r, s): args.run / "deq" / "finetuned" / f"{pruned[r].stem}.{s}" / "best.safetensors"
             for r in ratios for s in strategies}
    for path in [*pruned.values(), *tuned.values()]:
        if not path.exists():
            raise SpadeError(f"{path} is missing; run `spade demo --out {args.run}` first")
    check_outputs(files=[args.out], inputs=[*pruned.values(), *tuned.values()])
    # The bound each demo model was fine-tuned with: the parent's median ||J_T|| on that strategy's
    # data, as fine-tuning measured and recorded it (training split: supervised; test: the others).
    bounds = {key: (read_manifest(path).get("contraction") or {}).get("target") for key, path in tuned.items()}
    for (ratio, strategy), bound in bounds.items():
        if bound is None:
            raise SpadeError(f"{tuned[ratio, strategy]} records no contraction bound (fine-tuned without the penalty)")
    norms = {("train" if STRATEGIES[s].needs_ground_truth else "test"): b for (_, s), b in bounds.items()}
    parent, _ = load_model(read_manifest(pruned[ratios[0]])["pruning"]["parent"])  # the demo's unpruned base
    base = evaluate(parent, test, task)
    lines = [f"Small DEQ, the demo's recipe (the deq entry's `demo`, spade_deploy/mri/deq.py), embedded test split ({len(test)} slices); unpruned "
             f"{base.psnr:.2f} dB in {base.mean_iterations:.1f} iterations. Parent's ||J_T|| (median): training split "
             + (f"{norms['train']:.3f}" if "train" in norms else "–") + ", test measurements "
             + (f"{norms['test']:.3f}" if "test" in norms else "–") + f". Device: CPU {platform.machine()}, "
             f"{torch.get_num_threads()} threads. Command: `python benchmarks/contraction_target.py --run {args.run}"
             + "".join(f" --ratio {r:g}" for r in ratios) + "".join(f" --strategy {s}" for s in args.strategy or [])
             + f" --offset {args.offset:g}`.",
             "", "| ratio | strategy | bound | PSNR | iterations | bound - offset | PSNR | iterations |", "|" + "---|" * 8]
    with tempfile.TemporaryDirectory() as tmp:
        for (ratio, strategy), path in tuned.items():
            bound = bounds[ratio, strategy]
            at_parent = evaluate(load_model(path)[0], test, task)
            recipe_cfg = recipe.finetune[strategy]
            tight = dataclasses.replace(recipe_cfg, model_options=dataclasses.replace(
                recipe_cfg.model_options, lipschitz_target=bound - args.offset))
            res = finetune_model(pruned[ratio], strategy, root, Path(tmp) / f"{ratio:g}-{strategy}", tight,
                                 checkpoint_seconds=None)
            lower = evaluate(load_model(res.best_path)[0], test, task)
            lines.append(f"| {ratio:g} | {strategy} | {bound:.3f} | {at_parent.psnr:.2f} | {at_parent.mean_iterations:.1f} | "
                         f"{bound - args.offset:.3f} | {lower.psnr:.2f} | {lower.mean_iterations:.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out, text)


if __name__ == "__main__":
    main()
