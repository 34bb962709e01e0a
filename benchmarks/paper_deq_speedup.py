"""Paper-size DEQ: a whole reconstruction of one 160 x 160 slice, unpruned PyTorch vs SPADE-pruned
(per-layer ratio 0.4, 353,328 parameters) on each back-end, same tolerance and iteration cap,
timed side by side in one run.

    python benchmarks/paper_deq_speedup.py [--repeats 3] [--out benchmarks/results]   # defaults: the committed table

Weights: training the paper-size DEQ end to end takes days on a CPU, so the prior is trained as
a plug-and-play denoiser instead (stage 1 of `spade train`: Gaussian denoising of training images
with the Lipschitz penalty on the prior's Jacobian), on random crops of the embedded training
split, for ``--steps`` steps; then it is pruned, and the pruned and the unpruned priors are each
trained ``--steps // 2`` more steps on the same crops. Trained priors are kept in ``--weights`` and
reused. Two stopping rules, each the same for every variant: the paper's (tol 1e-4, cap 100) and a
fixed number of iterations (``--matched-iterations``), which compares whole reconstructions of
equal length when one model converges and the other does not (denoiser training alone does not
make every fixed-point map contractive). Iterations and the final residual are reported with each
time, and the per-iteration ratio, so convergence and per-iteration cost can be told apart.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import platform
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from spade_deploy import data as D
from spade_deploy.cli.main import progress_bar
from spade_deploy.bench import prior_macs, time_reconstruction
from spade_deploy.checkpoint import load_model, save_model
from spade_deploy.export import export_onnx
from spade_deploy.io import write_json, write_text
from spade_deploy.models import build_model, count_parameters, preset_config
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
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=500, help="denoiser training steps of the unpruned prior")
    ap.add_argument("--crop", type=int, default=48, help="training crop size")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--lipschitz-target", type=float, default=0.95,
                    help="bound on the prior's Jacobian norm that denoiser training enforces (DEQConfig.lipschitz_target)")
    ap.add_argument("--weights", type=Path, default=Path("runs/paper-deq"), help="where the trained priors are kept and reused")
    ap.add_argument("--matched-iterations", type=int, default=30, help="iterations of the fixed-length comparison")
    ap.add_argument("--train-only", action="store_true", help="train (or reuse) the priors, time nothing")
    ap.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    root = D.default_data_root()
    D.build_default_dataset(root)
    ds = D.SliceDataset(root / "test")
    items = D.collate([ds[0]])
    batch = make_batch(items, 6, 0.08, eval_seeds(items))

    train_ds = D.SliceDataset(root / "train")
    tag = f"{args.steps}-rho{args.lipschitz_target:g}"
    paths = {k: args.weights / f"{k}-{tag}.safetensors" for k in ("base", "unpruned", f"pruned-{args.ratio:g}")}

    def trained(key: str, make, steps: int, what: str, seed: int):
        """``make()`` trained for ``steps`` more denoiser steps, or the copy an earlier run kept."""
        if paths[key].exists():
            return load_model(paths[key])[0]
        model = make()
        train_denoiser(model, train_ds, steps, args.crop, what, seed=seed)
        save_model(paths[key], model, denoiser_steps=steps)
        return model

    # One schedule for both: the prior is trained, pruned, and then the pruned and the unpruned
    # priors are each trained for steps // 2 more (same seed), so neither has had more training.
    base = trained("base", lambda: build_model("deq", config=preset_config("deq", "paper", lipschitz_target=args.lipschitz_target)),
                   args.steps, "prior", seed=0)
    just_pruned, report = prune_model(base.eval(), args.ratio)
    dense = trained("unpruned", lambda: copy.deepcopy(base), args.steps // 2, "unpruned prior", seed=1)
    pruned = trained(f"pruned-{args.ratio:g}", lambda: just_pruned, args.steps // 2, f"pruned {args.ratio:g} prior", seed=1)
    if args.train_only:
        return
    dense.eval(), pruned.eval()
    # The same stopping rule for every variant: the paper's (tol 1e-4, cap 100), and a fixed number
    # of iterations (a tolerance no float32 iterate reaches), which times whole reconstructions of
    # equal length even where one model converges and the other does not.
    rules = {"tol 1e-4, cap 100": dense.solver_cfg,
             f"{args.matched_iterations} iterations": dataclasses.replace(dense.solver_cfg, tol=1e-12, max_iter=args.matched_iterations)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"unpruned": dense, f"pruned {args.ratio:g}": pruned}
        for i, (label, model) in enumerate(variants.items()):
            manifest = export_onnx(model, tmp, f"v{i}").manifest_path
            for backend in ("torch", "onnxruntime"):
                net = deploy(model, backend, manifest)
                for rule, solver in rules.items():
                    times = time_reconstruction(net, batch.y, batch.physics, warmup=1, repeats=args.repeats, solver=solver)
                    info = net.last_info
                    rows.append({
                        "rule": rule, "variant": label, "backend": backend, "params": count_parameters(model),
                        "macs_per_iteration": prior_macs(model, (160, 160)),
                        "iterations": int(info.iterations[0]), "converged": bool(info.converged[0]),
                        "final_residual": float(info.residual[0]),
                        "median_ms": 1000 * statistics.median(times), "times_ms": [1000 * t for t in times],
                    })
    for r in rows:
        base = next(b for b in rows if b["rule"] == r["rule"] and b["variant"] == "unpruned" and b["backend"] == "torch")
        r["speedup_vs_unpruned_torch"] = base["median_ms"] / r["median_ms"]
        r["per_iteration_speedup"] = (base["median_ms"] / base["iterations"]) / (r["median_ms"] / r["iterations"])
    device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    header = "| stopping rule | variant | backend | params | GMACs / iteration | iterations | final residual | median ms | speed-up | per-iteration speed-up |"
    lines = [f"Paper-size DEQ, one 160x160 slice ({batch.fnames[0]}:{batch.slices[0]}), acceleration 6, Anderson. "
             f"Device: {device}. Command: `python benchmarks/paper_deq_speedup.py --repeats {args.repeats} --steps {args.steps} "
             f"--lipschitz-target {args.lipschitz_target:g} --matched-iterations {args.matched_iterations}"
             + (f" --threads {args.threads}" if args.threads else "") + "`.",
             "", header, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['variant']} | {r['backend']} | {r['params']:,} | {r['macs_per_iteration'] / 1e9:.2f} | "
                     f"{r['iterations']} | {r['final_residual']:.1e} | {r['median_ms']:.0f} | x{r['speedup_vs_unpruned_torch']:.2f} | "
                     f"x{r['per_iteration_speedup']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out / "paper-deq-cpu.md", text)
    write_json(args.out / "paper-deq-cpu.json", {"device": device, "ratio": args.ratio, "repeats": args.repeats, "denoiser_steps": args.steps, "crop": args.crop,
                                                 "lipschitz_target": args.lipschitz_target,
                                                 "prune_report_params": [report.params_before, report.params_after], "rows": rows})


if __name__ == "__main__":
    main()
