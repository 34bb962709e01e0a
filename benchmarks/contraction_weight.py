"""The contraction penalty's weight against what it buys and costs: the demo's 0.4 pruned DEQs
(paper and measured widths) fine-tuned by each strategy with the demo's recipe at several
``lipschitz_weight`` values, each scored on the embedded test split and on the held-out set of
real MR images (``spade data --heldout``): mean iterations against the unpruned parent's, every
slice converged, fastMRI's PSNR. What chose the weight of the demo's recipe (spade_deploy/mri/deq.py).

    python benchmarks/contraction_weight.py --run runs/demo --weights 0.1 0.3 1

The fine-tunings go to ``--work`` (one folder a weight); the table to ``--out``. Iterations and
scores only: no timing, so other jobs may share the machine.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from spade_deploy.errors import SpadeError
from spade_deploy.io import read_manifest, write_json, write_text
from spade_deploy.mri.deq import DEMO
from spade_deploy.mri.heldout import build_heldout_dataset
from spade_deploy.mri.task import MRITask
from spade_deploy.paths import check_outputs
from spade_deploy.pipeline import data_folders, evaluate_checkpoint, finetune_run
from spade_deploy.progress import Reporter


def scores(path: Path, data: Path) -> dict:
    s = evaluate_checkpoint(path, MRITask(), data, "test").scores
    return {"iterations": s.mean_iterations, "converged": bool(s.all_converged), "psnr": s.psnr}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="the demo's --out folder (its deq/pruned models)")
    ap.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--strategies", nargs="+", default=list(DEMO.finetune))
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--data", type=Path, default=None, help="dataset root (default: the embedded dataset)")
    ap.add_argument("--heldout", type=Path, default=None, help="a held-out set made before (default: made now)")
    ap.add_argument("--work", type=Path, default=Path("runs/contraction-weight"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="contraction-weight-cpu")
    args = ap.parse_args()
    pruned = sorted((args.run / "deq" / "pruned").glob(f"*.pruned-{args.ratio:g}*.safetensors"))
    if not pruned:
        print(f"error: no DEQ pruned at {args.ratio:g} under {args.run}/deq/pruned", file=sys.stderr)
        return 1
    rows = []
    try:
        parent = Path((read_manifest(pruned[0]).get("pruning") or {}).get("parent") or "")
        if not parent.is_file():
            raise SpadeError(f"{pruned[0]} records no unpruned parent that exists")
        task = MRITask()
        data = task.data_root(args.data, Reporter())
        results = [args.out / f"{args.name}.{ext}" for ext in ("md", "json")]
        given = {"inputs": [*pruned, parent, args.heldout], "data": [*data_folders(data), *data_folders(args.heldout, ["test"])]}
        check_outputs(files=results, folders=[args.out], **given)
        check_outputs(folders=[args.work], option="--work", **given)
        with tempfile.TemporaryDirectory(prefix="spade-cw-") as tmp:
            heldout = args.heldout
            if heldout is None:
                heldout = Path(tmp) / "heldout"
                build_heldout_dataset(heldout)
            ref = {"test": scores(parent, data), "heldout": scores(parent, heldout)}
            for weight in args.weights:
                for strategy in args.strategies:
                    recipe = DEMO.finetune[strategy]
                    cfg = dataclasses.replace(recipe, model_options=dataclasses.replace(
                        recipe.model_options, lipschitz_weight=weight))
                    for src in pruned:
                        torch.manual_seed(0)
                        out = args.work / f"w{weight:g}" / f"{src.stem}.{strategy}"
                        best = finetune_run(src, strategy, None, data, out, cfg, task, checkpoint_seconds=None).best_path
                        widths = (read_manifest(src).get("pruning") or {}).get("widths")
                        row = {"weight": weight, "strategy": strategy,
                               "widths": "measured" if widths == "auto" else "paper",
                               "test": scores(best, data), "heldout": scores(best, heldout)}
                        row["holds"] = (row["heldout"]["converged"]
                                        and row["heldout"]["iterations"] <= ref["heldout"]["iterations"])
                        rows.append(row)
                        print(row, flush=True)
    except SpadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    command = "python benchmarks/contraction_weight.py " + " ".join(sys.argv[1:])
    lines = [f"The demo's {args.ratio:g} pruned DEQs fine-tuned with the demo's recipe at each contraction weight "
             f"(exact hinge on ||J_T|| above the parent's bound, every slice of each batch; seed 0, one run each). "
             f"held = held-out mean iterations <= the parent's and every slice converged. Unpruned parent: test "
             f"{ref['test']['psnr']:.2f} dB in {ref['test']['iterations']:.1f} iterations, held-out "
             f"{ref['heldout']['psnr']:.2f} dB in {ref['heldout']['iterations']:.1f}. Command: `{command}`.", "",
             "| weight | strategy | widths | test PSNR | test iterations | held-out iterations (parent "
             f"{ref['heldout']['iterations']:.1f}) | held | held-out PSNR |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, h = r["test"], r["heldout"]
        lines.append(f"| {r['weight']:g} | {r['strategy']} | {r['widths']} | {t['psnr']:.2f} | {t['iterations']:.1f} | "
                     f"{h['iterations']:.1f} | {'yes' if r['holds'] else '**no**'} | {h['psnr']:.2f} |")
    write_text(args.out / f"{args.name}.md", "\n".join(lines) + "\n")
    write_json(args.out / f"{args.name}.json", {"command": command, "parent": ref, "rows": rows})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
