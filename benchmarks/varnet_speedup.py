"""VarNet and E2E-VarNet (small preset): whole reconstructions of every 160 x 160 test slice,
unpruned PyTorch vs SPADE-pruned at 0.4, each in PyTorch and on the engine measured fastest here
(``auto``; ``--backend`` to force others), timed side by side in one run, per model.

    OMP_NUM_THREADS=1 python benchmarks/varnet_speedup.py [--run runs/demo-varnet] [--repeats 10]

The models are those `spade demo -m varnet -m e2e-varnet --out RUN` trained (the unpruned base and
the pruned model fine-tuned with ``--strategy``), so quality is reported beside the times. A VarNet
has no stopping rule: every model runs its cascades once, so latency depends on the architecture,
not on the weights. The variants are timed as `spade bench` times them
(:func:`spade_deploy.bench.time_interleaved`): round ``r`` reconstructs every test slice once with
every variant, the order rotated per round, so a load change hits all of them alike; latency is
each slice's median over the rounds, averaged over the slices. For E2E-VarNet the sensitivity
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

from spade_deploy.mri import reader, simulate
from spade_deploy.bench import AGGREGATION, bench_slices, prior_macs, time_interleaved
from spade_deploy.mri.task import MRITask
from spade_deploy.checkpoint import load_model
from spade_deploy.deploy.export import export_onnx
from spade_deploy.io import write_json, write_text
from spade_deploy.models import count_parameters
from spade_deploy.deploy.runtime import deploy
from spade_deploy.train import evaluate

MODELS = ("varnet", "e2e-varnet")


def main() -> None:
    from spade_deploy.hostmem import keep_freed_memory

    keep_freed_memory()  # as the spade command runs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo-varnet"), help="the demo's --out folder")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--strategy", default="supervised", help="which fine-tuned pruned model to time")
    ap.add_argument("--repeats", type=int, default=10, help="interleaved rounds (every variant reconstructs every test slice once each)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--backend", action="append", default=None,
                    help="back-ends besides the unpruned PyTorch reference (repeatable; default: torch and auto)")
    ap.add_argument("--slices", type=int, default=None, help="time the first N test slices only (default: all)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--stem", default="varnet-speedup-cpu")
    args = ap.parse_args()

    root = simulate.default_data_root()
    test_ds = reader.SliceDataset(root / "test")
    slices = bench_slices(test_ds, MRITask(6, 0.08), torch.device("cpu"))[: args.slices]
    y, physics = slices[0][:2]
    backends = list(dict.fromkeys(args.backend or ["torch", "auto"]))

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
                names = backends if label != "unpruned" or "torch" in backends else ["torch", *backends]
                for backend in names:
                    net = deploy(model, backend, manifest, sample=(y, physics))
                    variants.append((name, label, path, backend, net.eval(), model))

        with torch.no_grad():
            for v in variants:
                for _ in range(args.warmup):
                    v[4](y, physics)
        timed = time_interleaved([v[4] for v in variants], slices, args.repeats)
        e2e = next(v[5] for v in variants if v[0] == "e2e-varnet")
        sens_times = [[t for _ in range(args.repeats) for t in _time_sens_net(e2e, s[0], s[1])] for s in slices]

        rows = []
        for (name, label, path, backend, net, model), t in zip(variants, timed):
            choice = getattr(net, "engine_choice", None)
            rows.append({
                "model": name, "variant": label, "backend": backend, "checkpoint": str(path),
                "engine": ",".join(sorted(set(choice.values()))) if choice else backend,
                "params": count_parameters(model), "prior_macs": prior_macs(model, tuple(y.shape[-2:])),
                "latency_ms": t.latency_ms, "iqr_ms": t.iqr_ms, "slice_latency_ms": t.median_ms,
                "times_ms": [[1000 * s for s in ts] for ts in t.seconds],
            })
        for name in MODELS:
            base = next(r for r in rows if r["model"] == name and r["variant"] == "unpruned" and r["backend"] == "torch")
            res = {}
            for r, v in zip(rows, variants):
                if r["model"] != name:
                    continue
                r["speedup_vs_unpruned_torch"] = base["latency_ms"] / r["latency_ms"]
                if r["checkpoint"] not in res:  # quality: the same on both back-ends (demo table); scored once, in torch
                    res[r["checkpoint"]] = evaluate(v[5], test_ds)
                r["psnr"], r["ssim"] = res[r["checkpoint"]].psnr, res[r["checkpoint"]].ssim

    sens_ms = float(np.mean([1000 * statistics.median(t) for t in sens_times]))
    device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    command = (f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/varnet_speedup.py --run {args.run} "
               f"--repeats {args.repeats} --warmup {args.warmup} --ratio {args.ratio:g} --strategy {args.strategy}"
               + "".join(f" --backend {b}" for b in args.backend or []) + (f" --slices {args.slices}" if args.slices else ""))
    lines = [
        f"VarNet / E2E-VarNet, small preset, {len(slices)} test slices of {'x'.join(map(str, y.shape[-2:]))}, acceleration 6; "
        f"{args.repeats} interleaved rounds after {args.warmup} warm-up runs; {AGGREGATION}. Device: {device}. "
        f"Command: `{command}`. Quality: the embedded test split ({len(test_ds)} slices), reference reconstruction_rss.",
        "",
        "| model | variant | backend | engine | params | prior GMACs | PSNR | SSIM | ms / slice | IQR ms | speed-up vs unpruned torch |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {r['engine']} | {r['params']:,} | {r['prior_macs'] / 1e9:.2f} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {r['latency_ms']:.1f} | {r['iqr_ms']:.1f} | "
                     f"x{r['speedup_vs_unpruned_torch']:.2f} |")
    lines += ["", f"E2E-VarNet's sensitivity network alone (torch, not pruned): {sens_ms:.1f} ms per slice (median per slice, mean over slices)."]
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out / f"{args.stem}.md", text)
    write_json(args.out / f"{args.stem}.json", {
        "device": device, "command": command, "ratio": args.ratio, "strategy": args.strategy, "repeats": args.repeats,
        "warmup": args.warmup, "backends": backends, "aggregation": AGGREGATION, "slices": [s[2] for s in slices],
        "slice_shape": list(y.shape[-2:]), "sens_net_ms": sens_ms,
        "sens_net_times_ms": [[1000 * s for s in t] for t in sens_times], "rows": rows,
    })


@torch.no_grad()
def _time_sens_net(model, y: torch.Tensor, physics) -> list[float]:
    """One timed call of E2E-VarNet's coil-map estimation (what the cascades' pruning cannot speed up)."""
    t0 = time.perf_counter()
    model.coil_maps(y, physics)
    return [time.perf_counter() - t0]


if __name__ == "__main__":
    main()
