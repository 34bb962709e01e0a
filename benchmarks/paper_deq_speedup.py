"""Paper-size DEQ: a whole reconstruction of one 160 x 160 slice, unpruned PyTorch vs SPADE-pruned
(per-layer ratio 0.4, 353,328 parameters) on each back-end, same tolerance and iteration cap,
timed side by side in one run.

    python benchmarks/paper_deq_speedup.py [--repeats 5] [--out benchmarks/results]

Weights: training the paper-size DEQ end to end takes days on a CPU, so the prior is trained as
a plug-and-play denoiser instead (stage 1 of `spade train`: Gaussian denoising of training images
with the Lipschitz penalty that makes the fixed-point map a contraction), on random crops of the
embedded training split, for ``--steps`` steps; the pruned prior is re-trained the same way for
``--steps // 2`` steps. With ``--steps 0`` the weights are those at initialisation, whose fixed
point never converges (both models then run to the cap). Iteration counts are reported next to
the times: speed-ups compare whole reconstructions under one stopping rule, and the
per-iteration ratio is printed too so the two effects can be told apart.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from spade_deploy import data as D
from spade_deploy.cli.main import progress_bar
from spade_deploy.bench import prior_macs, time_reconstruction
from spade_deploy.checkpoint import save_model
from spade_deploy.export import export_onnx
from spade_deploy.io import write_json, write_text
from spade_deploy.models import build_model, count_parameters
from spade_deploy.prune import prune_model
from spade_deploy.runtime import deploy
from spade_deploy.train import eval_seeds, make_batch


def train_denoiser(model, ds, steps: int, crop: int, what: str, seed: int = 0, batch_size: int = 4) -> None:
    """Stage 1 of `spade train` (``DEQ.pretrain_loss``: denoising + Lipschitz penalty) on random crops."""
    if steps <= 0:
        return
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with progress_bar() as bar:
        task = bar.add_task(f"training {what} as a denoiser", total=steps, info="")
        for step in range(steps):
            idx = torch.randint(0, len(ds), (batch_size,), generator=g).tolist()
            items = D.collate([ds[i] for i in idx])
            x = D.sense_combine(items["kspace"], items["smaps"])
            h, w = x.shape[-2:]
            i, j = (int(torch.randint(0, n - crop + 1, (), generator=g)) for n in (h, w))
            loss = model.pretrain_loss(SimpleNamespace(x_gt=x[:, i : i + crop, j : j + crop]), reg_weight=10.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(task, advance=1, info=f"loss {loss.item():.4f}")
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=300, help="denoiser training steps of the unpruned prior")
    ap.add_argument("--crop", type=int, default=48, help="training crop size")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    torch.manual_seed(0)
    root = D.default_data_root()
    D.build_default_dataset(root)
    ds = D.SliceDataset(root / "test")
    items = D.collate([ds[0]])
    batch = make_batch(items, 6, 0.08, eval_seeds(items))

    dense = build_model("deq", preset="paper")
    train_ds = D.SliceDataset(root / "train")
    train_denoiser(dense, train_ds, args.steps, args.crop, "unpruned prior")
    pruned, report = prune_model(dense.eval(), args.ratio)
    train_denoiser(pruned, train_ds, args.steps // 2, args.crop, f"pruned {args.ratio:g} prior", seed=1)
    dense.eval(), pruned.eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"unpruned": dense, f"pruned {args.ratio:g}": pruned}
        for label, model in variants.items():
            save_model(Path(tmp) / f"{len(rows)}.safetensors", model)
            manifest = export_onnx(model, tmp, f"v{len(rows)}").manifest_path
            for backend in ("torch", "onnxruntime"):
                net = deploy(model, backend, manifest)
                times = time_reconstruction(net, batch.y, batch.physics, warmup=1, repeats=args.repeats)
                info = net.last_info
                rows.append({
                    "variant": label, "backend": backend, "params": count_parameters(model),
                    "macs_per_iteration": prior_macs(model, (160, 160)),
                    "iterations": int(info.iterations[0]), "converged": bool(info.converged[0]),
                    "median_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times],
                })
    base = rows[0]
    for r in rows:
        r["speedup_vs_unpruned_torch"] = base["median_ms"] / r["median_ms"]
        r["per_iteration_speedup"] = (base["median_ms"] / base["iterations"]) / (r["median_ms"] / r["iterations"])
    device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    header = "| variant | backend | params | GMACs / iteration | iterations | converged | median ms | speed-up | per-iteration speed-up |"
    lines = [f"Paper-size DEQ, one 160x160 slice ({batch.fnames[0]}:{batch.slices[0]}), acceleration 6, "
             f"tol 1e-4, cap 100, Anderson. Device: {device}. Command: `python benchmarks/paper_deq_speedup.py --repeats {args.repeats} --steps {args.steps}`.",
             "", header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['backend']} | {r['params']:,} | {r['macs_per_iteration'] / 1e9:.2f} | "
                     f"{r['iterations']} | {r['converged']} | {r['median_ms']:.0f} | x{r['speedup_vs_unpruned_torch']:.2f} | "
                     f"x{r['per_iteration_speedup']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out / "paper-deq-cpu.md", text)
    write_json(args.out / "paper-deq-cpu.json", {"device": device, "ratio": args.ratio, "repeats": args.repeats, "denoiser_steps": args.steps, "crop": args.crop,
                                                 "prune_report_params": [report.params_before, report.params_after], "rows": rows})


if __name__ == "__main__":
    main()
