"""VarNet and E2E-VarNet (small preset): a whole reconstruction of one 160 x 160 slice, unpruned
PyTorch vs SPADE-pruned at 0.4 and deployed, on torch and onnxruntime, timed side by side in one
run, per model.

    OMP_NUM_THREADS=1 python benchmarks/varnet_speedup.py [--run runs/demo-varnet] [--repeats 30]

The models are those `spade demo -m varnet -m e2e-varnet --out RUN` trained (the unpruned base and
the pruned model fine-tuned with ``--strategy``), so quality is reported beside the times. A VarNet
has no stopping rule: every model runs its cascades once, so latency depends on the architecture,
not on the weights. On a shared machine the variants are timed interleaved (one reconstruction of
each per round, the order rotating from round to round), so a load change hits all of them alike;
the median and interquartile range over the rounds are reported. For E2E-VarNet the sensitivity
network (never pruned, run in torch) is timed on its own too: it bounds what pruning the cascades
can gain.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from spade_deploy import data as D
from spade_deploy.bench import prior_macs, time_reconstruction
from spade_deploy.checkpoint import load_model
from spade_deploy.export import export_onnx
from spade_deploy.io import write_json, write_text
from spade_deploy.models import count_parameters
from spade_deploy.runtime import deploy
from spade_deploy.train import eval_seeds, evaluate, make_batch

MODELS = ("varnet", "e2e-varnet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo-varnet"), help="the demo's --out folder")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--strategy", default="supervised", help="which fine-tuned pruned model to time")
    ap.add_argument("--repeats", type=int, default=30, help="timed rounds (one reconstruction per variant each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--stem", default="varnet-speedup-cpu")
    args = ap.parse_args()

    root = D.default_data_root()
    test_ds = D.SliceDataset(root / "test")
    items = D.collate([test_ds[0]])
    batch = make_batch(items, 6, 0.08, eval_seeds(items))
    y, physics = batch.y, batch.physics

    variants = []  # (model name, label, checkpoint, backend, deployed model, loaded model)
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            paths = {"unpruned": args.run / name / "base" / "best.safetensors",
                     f"pruned {args.ratio:g} {args.strategy}":
                         args.run / name / "finetuned" / f"best.pruned-{args.ratio:g}.{args.strategy}" / "best.safetensors"}
            for label, path in paths.items():
                if not path.exists():
                    raise SystemExit(f"error: {path} is missing; run `spade demo -m varnet -m e2e-varnet --out {args.run}` first")
                model, _ = load_model(path)
                model.eval()
                manifest = export_onnx(model, tmp, f"{name}.{len(variants)}").manifest_path
                for backend in ("torch", "onnxruntime"):
                    variants.append((name, label, path, backend, deploy(model, backend, manifest), model))

        for v in variants:
            time_reconstruction(v[4], y, physics, warmup=args.warmup, repeats=0)
        times: list[list[float]] = [[] for _ in variants]
        sens_times: list[float] = []
        e2e = next(v[5] for v in variants if v[0] == "e2e-varnet")
        for r in range(args.repeats):
            order = list(range(len(variants)))
            order = order[r % len(order):] + order[: r % len(order)]
            for i in order:
                times[i] += time_reconstruction(variants[i][4], y, physics, warmup=0, repeats=1)
            sens_times += _time_sens_net(e2e, y, physics)

        rows = []
        for (name, label, path, backend, net, model), t in zip(variants, times):
            q1, q3 = np.percentile(t, [25, 75])
            rows.append({
                "model": name, "variant": label, "backend": backend, "checkpoint": str(path),
                "params": count_parameters(model), "prior_macs": prior_macs(model, tuple(y.shape[-2:])),
                "median_ms": 1000 * statistics.median(t), "iqr_ms": 1000 * float(q3 - q1),
                "times_ms": [1000 * s for s in t],
            })
        for name in MODELS:
            base = next(r for r in rows if r["model"] == name and r["variant"] == "unpruned" and r["backend"] == "torch")
            res = {}
            for r, v in zip(rows, variants):
                if r["model"] != name:
                    continue
                r["speedup_vs_unpruned_torch"] = base["median_ms"] / r["median_ms"]
                if r["checkpoint"] not in res:  # quality: the same on both back-ends (demo table); scored once, in torch
                    res[r["checkpoint"]] = evaluate(v[5], test_ds)
                r["psnr"], r["ssim"] = res[r["checkpoint"]].psnr, res[r["checkpoint"]].ssim

    sens_ms = 1000 * statistics.median(sens_times)
    device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    lines = [
        f"VarNet / E2E-VarNet, small preset, one 160x160 slice ({batch.fnames[0]}:{batch.slices[0]}), acceleration 6; "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up runs. Device: {device}. "
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/varnet_speedup.py --run {args.run} "
        f"--repeats {args.repeats}`. Quality: the embedded test split (12 slices), reference reconstruction_rss.",
        "",
        "| model | variant | backend | params | prior GMACs | PSNR | SSIM | median ms | IQR ms | speed-up vs unpruned torch |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {r['params']:,} | {r['prior_macs'] / 1e9:.2f} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['median_ms']:.1f} | {r['iqr_ms']:.1f} | "
                     f"x{r['speedup_vs_unpruned_torch']:.2f} |")
    lines += ["", f"E2E-VarNet's sensitivity network alone (torch, not pruned): median {sens_ms:.1f} ms per slice."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out / f"{args.stem}.md", text)
    write_json(args.out / f"{args.stem}.json", {
        "device": device, "ratio": args.ratio, "strategy": args.strategy, "repeats": args.repeats, "warmup": args.warmup,
        "timing_slice": f"{batch.fnames[0]}:{batch.slices[0]}", "slice_shape": list(y.shape[-2:]),
        "sens_net_median_ms": sens_ms, "sens_net_times_ms": [1000 * s for s in sens_times], "rows": rows,
    })


@torch.no_grad()
def _time_sens_net(model, y: torch.Tensor, physics) -> list[float]:
    """One timed call of E2E-VarNet's coil-map estimation (what the cascades' pruning cannot speed up)."""
    t0 = time.perf_counter()
    model.coil_maps(y, physics)
    return [time.perf_counter() - t0]


if __name__ == "__main__":
    main()
