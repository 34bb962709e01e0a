"""Speed that holds on data not tuned on: the demo's unpruned DEQ and every variant pruned at the
largest ratio, benched (`spade bench`'s :func:`~spade_deploy.pipeline.bench_checkpoints`: fastMRI's
scores, interleaved timing) on the held-out set of real MR images (``spade data --heldout``,
:mod:`spade_deploy.mri.heldout`: nibabel's EPI brain series and matplotlib's sagittal head, the
embedded data's acquisition), none of which trained or fine-tuned any model.

    python benchmarks/heldout.py [--run runs/demo] [--before RUN] [--checkpoint CKPT ...]
                                 [--ratio 0.4] [--backend auto] [--repeats 2] [--out benchmarks/results]

``--run``: the demo's ``--out`` folder (``<run>/deq/finetuned/<pruned stem>.<strategy>/best.safetensors``;
the parent is ``<run>/deq/base/best.safetensors`` or, where the demo used the shipped base, the
parent its pruned models record). ``--checkpoint``: the parent first, then variants, instead.
``--before``: a second run (e.g. one fine-tuned before a change), benched the same way and shown
beside. The check that must hold for every variant: mean iterations <= the parent's on the
held-out set, every slice converged (stopped on the tolerance, not on the iteration cap). Writes
``<out>/demo-heldout-cpu.{md,json}``; exit status 1 when a variant fails the check.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from spade_deploy.errors import SpadeError
from spade_deploy.io import read_manifest, write_json, write_text
from spade_deploy.mri.heldout import build_heldout_dataset
from spade_deploy.mri.task import MRITask
from spade_deploy.pipeline import bench_checkpoints


def run_checkpoints(run: Path, ratio: float) -> list[Path]:
    """The parent and the fine-tuned variants pruned at ``ratio`` of a demo run."""
    tuned = sorted(p / "best.safetensors" for p in (run / "deq" / "finetuned").glob(f"*.pruned-{ratio:g}*")
                   if (p / "best.safetensors").is_file())
    if not tuned:
        raise SpadeError(f"no fine-tuned models pruned at {ratio:g} under {run}/deq/finetuned")
    base = run / "deq" / "base" / "best.safetensors"
    if not base.is_file():
        parent = (read_manifest(tuned[0]).get("pruning") or {}).get("parent")
        if not parent or not Path(parent).is_file():
            raise SpadeError(f"{run} has no deq/base/best.safetensors and {tuned[0]} records no parent that exists")
        base = Path(parent)
    return [base, *tuned]


def check(rows: list[dict]) -> list[dict]:
    """Per variant: its iterations against the parent's (same bench), converged, speed-up."""
    parent = next(r for r in rows if not r["ratio"])
    out = []
    for r in rows:
        out.append({
            "ratio": r["ratio"], "strategy": r["strategy"], "widths": r.get("widths"), "engine": r.get("engine"),
            "backend": r["backend"], "precision": r.get("precision", "fp32"),
            "mean_iterations": r["mean_iterations"], "parent_iterations": parent["mean_iterations"],
            "max_iterations": max(r.get("slice_iterations") or [0]), "slices_on_cap": r.get("slices_on_cap"),
            "all_converged": r["all_converged"], "psnr": r["psnr"], "ssim": r["ssim"],
            "latency_ms": r.get("latency_ms"), "speedup_vs_torch": r.get("speedup_vs_torch"),
            "speedup_same_backend": r.get("speedup_same_backend"),
            "holds": bool(r["all_converged"]) and (not r["ratio"] or r["mean_iterations"] <= parent["mean_iterations"]),
        })
    return out


def contraction(path: Path) -> str:
    m = read_manifest(path)
    c, tc = m.get("contraction") or {}, m.get("train_config") or {}
    if not c:
        return "–"
    samples = tc.get("lipschitz_samples", "?")
    return (f"{c.get('target', float('nan')):.3f} (w {tc.get('lipschitz_weight', '?')}, "
            f"{'every slice' if samples is None else samples})")


def variant_key(path: Path) -> tuple:
    """(ratio, strategy, widths) of a checkpoint: what ties a bench row to its checkpoint."""
    m = read_manifest(path)
    return ((m.get("pruning") or {}).get("ratio") or 0, (m.get("finetune") or {}).get("strategy") or "–",
            (m.get("pruning") or {}).get("widths") or "–")


def table(title: str, rows: list[dict], paths: list[Path]) -> list[str]:
    lines = [f"### {title}", "", "| ratio | strategy | widths | engine | precision | contraction bound (weight, slices per step) | "
             "iterations | parent | max | on cap | held | PSNR | SSIM | ms/slice | speed-up | same backend |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bounds = {variant_key(p): contraction(p) for p in paths}
    for r in rows:
        b = bounds.get((r["ratio"] or 0, r["strategy"] if r["ratio"] else "–", r["widths"] if r["ratio"] else "–"), "–")
        speed = f"x{r['speedup_vs_torch']:.2f}" if r.get("speedup_vs_torch") else "–"
        same = f"x{r['speedup_same_backend']:.2f}" if r.get("speedup_same_backend") else "–"
        lines.append(f"| {r['ratio'] or 0:.0%} | {r['strategy'] if r['ratio'] else '–'} | "
                     f"{r['widths'] if r['ratio'] else '–'} | {r['engine'] or r['backend']} | {r['precision']} | {b} | "
                     f"{r['mean_iterations']:.1f} | {r['parent_iterations']:.1f} | {r['max_iterations']} | "
                     f"{r['slices_on_cap']} | {'yes' if r['holds'] else '**no**'} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                     f"{r['latency_ms']:.1f} | {speed} | {same} |")
    return lines + [""]


def main() -> int:
    from spade_deploy.hostmem import keep_freed_memory

    keep_freed_memory()  # as the spade command runs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"), help="the demo's --out folder")
    ap.add_argument("--before", type=Path, default=None, help="another run to bench beside (e.g. before a change)")
    ap.add_argument("--checkpoint", type=Path, action="append", default=None,
                    help="the parent, then variants (repeatable), instead of --run")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--data", type=Path, default=None, help="a held-out set made before (default: made now, in a temp folder)")
    ap.add_argument("--backend", "-b", action="append", default=None, help="repeatable; default auto, as the demo")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--name", default="demo-heldout-cpu")
    args = ap.parse_args()
    try:
        runs = [("after" if args.before else "run", args.checkpoint or run_checkpoints(args.run, args.ratio))]
        if args.before:
            runs.insert(0, ("before", run_checkpoints(args.before, args.ratio)))
        for _, paths in runs:
            keys = [variant_key(p) for p in paths]
            if len(set(keys)) < len(keys):
                raise SpadeError("two checkpoints of one run have the same ratio, strategy and widths, so their rows "
                                 "could not be told apart: give one of them with --before")
        task = MRITask()
        load = [os.getloadavg()[0]]
        with tempfile.TemporaryDirectory(prefix="spade-heldout-") as tmp:
            data = args.data
            if data is None:
                data = Path(tmp) / "heldout"
                build_heldout_dataset(data)
            results, md = {}, []
            for name, paths in runs:
                bench = bench_checkpoints(paths, args.backend or ["auto"], Path(tmp) / "engines", data, "test", task,
                                          repeats=args.repeats, warmup=1, device="cpu", out=Path(tmp) / f"results-{name}")
                rows = check([vars(r) if not isinstance(r, dict) else r for r in bench.result.rows])
                results[name] = {"checkpoints": [str(p) for p in paths], "rows": rows,
                                 "holds": all(r["holds"] for r in rows)}
                title = {"before": f"Before ({args.before})", "after": f"After ({args.run})",
                         "run": "checkpoints given" if args.checkpoint else str(args.run)}[name]
                md += table(title, rows, paths)
            device = bench.result.device
            load.append(os.getloadavg()[0])
    except SpadeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    command = "python benchmarks/heldout.py " + " ".join(sys.argv[1:])
    head = [f"Held-out set: `spade data --heldout` (nibabel's EPI brain series, 2 files x 6 axial slices, and "
            f"matplotlib's sagittal head, 4 poses; the embedded data's coils, phase, noise, 160x160), used by no "
            f"training or fine-tuning. Device: {device}. Fixed point: tol 1e-4, cap 100. held = mean iterations <= the "
            f"parent's on this set and every slice converged. Speed-ups against the unpruned PyTorch model on this "
            f"set; the machine's 1-minute load average was {load[0]:.1f} at the start and {load[-1]:.1f} at the end "
            f"(the timing columns compare like with like only when it stays near the number of threads). "
            f"Command: `{command}`.", ""]
    write_text(args.out / f"{args.name}.md", "\n".join(head + md))
    write_json(args.out / f"{args.name}.json", {"device": device, "command": command, "load_average": load, **results})
    print("\n".join(head + md))
    return 0 if all(r["holds"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
