"""Paper-size DEQ: whole reconstructions of every 160 x 160 test slice, unpruned PyTorch vs
SPADE-pruned (per-layer ratio 0.4, 353,328 parameters) in PyTorch and on the engine measured
fastest here (``auto``), same tolerance and iteration cap, timed side by side in one run.

    python benchmarks/paper_deq_speedup.py [--repeats 3] [--slices N] [--out benchmarks/results]

Timing as `spade bench` times (:func:`spade_deploy.bench.time_interleaved`): round ``r``
reconstructs every slice once with every variant, the order rotated per round; latency is each
slice's median over the rounds, averaged over the slices; per iteration, the sum of those medians
over the slices' iterations.

Weights: training the paper-size DEQ to convergence takes days on a CPU, so it is trained in two
short stages on the embedded training split. Stage 1 (of `spade train`): the prior as a Gaussian
denoiser of random crops with the Lipschitz penalty on its Jacobian, ``--steps`` steps; then it is
pruned, and the pruned and the unpruned priors are each trained ``--steps // 2`` more denoiser
steps. Stage 2: each is trained ``--deq-steps`` steps as a DEQ on whole slices (`spade finetune
--strategy supervised`'s loss and trainer: ground truth, fixed-point forward pass, penalty on the
norm of the whole iteration's Jacobian) -- for the pruned model that is SPADE's supervised
fine-tuning; without it the unpruned denoiser gives an expansive fixed-point map (||J_T|| ~1.35)
that stops on the iteration cap. Both models get the same schedule, so neither has had more
training. Trained models are kept in ``--weights`` and reused. Two stopping rules, each the same
for every variant: the paper's (tol 1e-4, cap 100) and a fixed number of iterations
(``--matched-iterations``), which separates the gain per iteration from a difference in
convergence. Iterations and the final residual are reported with each time, and the per-iteration
ratio.
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

from spade_deploy.mri import reader, simulate
from spade_deploy.cli.main import progress_bar
from spade_deploy.bench import AGGREGATION, prior_macs, time_interleaved
from spade_deploy.checkpoint import load_model, save_model
from spade_deploy.deploy.export import export_onnx
from spade_deploy.io import write_json, write_text
from spade_deploy.losses import STRATEGIES
from spade_deploy.mri.metrics import psnr
from spade_deploy.models import build_model, count_parameters, preset_config
from spade_deploy.prune import prune_model
from spade_deploy.deploy.runtime import deploy
from spade_deploy.mri.acquisition import eval_seeds, make_batch
from spade_deploy.mri.deq import DEQTrainOptions
from spade_deploy.train import TrainConfig, fit


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
            items = reader.collate([ds[i] for i in idx])
            x = make_batch(items, 6, 0.08, None).x_gt  # SENSE image of the maps estimated from the ACS block
            h, w = x.shape[-2:]
            i, j = (int(torch.randint(0, n - crop + 1, (), generator=g)) for n in (h, w))
            loss = model.pretrain_loss(SimpleNamespace(x_gt=x[:, i : i + crop, j : j + crop]), reg_weight=10.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(task, advance=1, info=f"loss {loss.item():.4f}")
    model.eval()


def train_deq(model, ds, steps: int, lr: float, target: float, what: str) -> None:
    """Stage 2: ``steps`` supervised fixed-point training steps on whole slices (batch 1), with the
    whole-iteration Jacobian penalty at ``target`` (``DEQ.regularizer(on="operator")``)."""
    if steps <= 0:
        return
    cfg = TrainConfig(epochs=1, lr=lr, batch_size=1, max_steps_per_epoch=steps, model_options=DEQTrainOptions(
        lipschitz_on="operator", lipschitz_target=target, train_max_iter=30, train_tol=1e-3))
    with progress_bar() as bar, tempfile.TemporaryDirectory() as tmp:
        task = bar.add_task(f"training {what} as a DEQ", total=steps, info="")
        fit(model, STRATEGIES["supervised"](), ds, None, cfg, tmp,
            on_step=lambda _what, i, _n, loss: bar.update(task, completed=i, info=f"loss {loss:.4f}"))
    model.eval()


def main() -> None:
    from spade_deploy.hostmem import keep_freed_memory

    keep_freed_memory()  # as the spade command runs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=500, help="denoiser training steps of the unpruned prior")
    ap.add_argument("--crop", type=int, default=48, help="training crop size")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--deq-steps", type=int, default=120, help="stage-2 fixed-point training steps of each model")
    ap.add_argument("--deq-lr", type=float, default=2e-4)
    ap.add_argument("--lipschitz-target", type=float, default=0.95,
                    help="bound on the Jacobian norm both stages enforce: the prior's (stage 1), the whole iteration's (stage 2)")
    ap.add_argument("--weights", type=Path, default=Path("runs/paper-deq"), help="where the trained priors are kept and reused")
    ap.add_argument("--matched-iterations", type=int, default=30, help="iterations of the fixed-length comparison")
    ap.add_argument("--train-only", action="store_true", help="train (or reuse) the priors, time nothing")
    ap.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: torch's)")
    ap.add_argument("--slices", type=int, default=None, help="time the first N test slices only (default: all)")
    ap.add_argument("--backend", action="append", default=None,
                    help="back-ends besides the unpruned PyTorch reference (repeatable; default: torch and auto)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    root = simulate.default_data_root()
    simulate.build_default_dataset(root)
    ds = reader.SliceDataset(root / "test")
    batches = []
    for i in range(len(ds) if args.slices is None else min(args.slices, len(ds))):
        items = reader.collate([ds[i]])
        batches.append(make_batch(items, 6, 0.08, eval_seeds(items)))
    slices = [(b.y, b.physics, "{}:{}".format(*b.keys[0])) for b in batches]
    backends = list(dict.fromkeys(args.backend or ["torch", "auto"]))

    train_ds = reader.SliceDataset(root / "train")
    tag = f"{args.steps}-rho{args.lipschitz_target:g}"
    deq_tag = f"{tag}-deq{args.deq_steps}-lr{args.deq_lr:g}"
    pruned_key = f"pruned-{args.ratio:g}"

    def trained(key: str, make, train, what: str):
        """``make()`` trained by ``train(model)``, or the copy an earlier run kept in ``--weights``."""
        path = args.weights / f"{key}.safetensors"
        if path.exists():
            return load_model(path)[0]
        model = make()
        train(model)
        save_model(path, model, training=what)
        return model

    def denoiser(steps: int, seed: int, what: str = "prior"):
        return lambda model: train_denoiser(model, train_ds, steps, args.crop, what, seed=seed)

    def deq(what: str):
        return lambda model: train_deq(model, train_ds, args.deq_steps, args.deq_lr, args.lipschitz_target, what)

    # One schedule for both: the prior is trained, pruned, and then the pruned and the unpruned
    # models each get steps // 2 more denoiser steps (same seed) and the same DEQ stage.
    base = trained(f"base-{tag}", lambda: build_model("deq", config=preset_config("deq", "paper", lipschitz_target=args.lipschitz_target)),
                   denoiser(args.steps, seed=0), f"denoiser {args.steps} steps")
    just_pruned, report = prune_model(base.eval(), args.ratio)
    stage1 = f"denoiser {args.steps} + {args.steps // 2} steps"
    dense = trained(f"unpruned-{tag}", lambda: copy.deepcopy(base), denoiser(args.steps // 2, seed=1, what="unpruned prior"), stage1)
    pruned = trained(f"{pruned_key}-{tag}", lambda: just_pruned, denoiser(args.steps // 2, seed=1, what=f"pruned {args.ratio:g} prior"), stage1)
    stage2 = f"{stage1}, then DEQ {args.deq_steps} steps at lr {args.deq_lr:g}"
    dense = trained(f"unpruned-{deq_tag}", lambda: dense, deq("unpruned model"), stage2)
    pruned = trained(f"{pruned_key}-{deq_tag}", lambda: pruned, deq(f"pruned {args.ratio:g} model"), stage2)
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
        nets = []  # (variant, backend, deployed model, sizes)
        for i, (label, model) in enumerate({"unpruned": dense, f"pruned {args.ratio:g}": pruned}.items()):
            manifest = export_onnx(model, tmp, f"v{i}").manifest_path
            size = {"params": count_parameters(model), "macs_per_iteration": prior_macs(model, (160, 160))}  # once per variant
            names = backends if label != "unpruned" or "torch" in backends else ["torch", *backends]
            for backend in names:
                nets.append((label, backend, deploy(model, backend, manifest, sample=slices[0][:2]).eval(), size))
        for rule, solver in rules.items():
            quality = []
            for label, backend, net, size in nets:  # the warm-up pass over every slice, scored
                q = {"psnr": [], "residual": [], "converged": []}
                with torch.no_grad():
                    for b in batches:
                        out = net(b.y, b.physics, solver=solver)
                        q["psnr"].append(psnr(b.x_gt.abs().numpy(), out.abs().numpy()))
                        q["residual"].append(float(net.solve_info().residual[0]))
                        q["converged"].append(bool(net.solve_info().converged[0]))
                quality.append(q)
            timed = time_interleaved([n[2] for n in nets], slices, args.repeats, solver=solver)
            for (label, backend, net, size), q, t in zip(nets, quality, timed):
                choice = getattr(net, "engine_choice", None)
                rows.append({
                    "rule": rule, "variant": label, "backend": backend, **size,
                    "engine": ",".join(sorted(set(choice.values()))) if choice else backend,
                    "iterations": float(statistics.mean(t.iterations)), "slice_iterations": t.iterations,
                    "slices_on_cap": sum(not c for c in q["converged"]), "final_residual": max(q["residual"]),
                    "psnr": float(statistics.mean(q["psnr"])), "latency_ms": t.latency_ms,
                    "ms_per_iteration": t.ms_per_iteration, "slice_latency_ms": t.median_ms,
                    "times_ms": [[1000 * x for x in ts] for ts in t.seconds],
                })
    for r in rows:
        base = next(b for b in rows if b["rule"] == r["rule"] and b["variant"] == "unpruned" and b["backend"] == "torch")
        r["speedup_vs_unpruned_torch"] = base["latency_ms"] / r["latency_ms"]
        r["per_iteration_speedup"] = base["ms_per_iteration"] / r["ms_per_iteration"]
        r["efficiency"] = r["per_iteration_speedup"] / (base["macs_per_iteration"] / r["macs_per_iteration"])
    device = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    command = (f"python benchmarks/paper_deq_speedup.py --repeats {args.repeats} --steps {args.steps} "
               f"--deq-steps {args.deq_steps} --deq-lr {args.deq_lr:g} --lipschitz-target {args.lipschitz_target:g} "
               f"--matched-iterations {args.matched_iterations}" + (f" --threads {args.threads}" if args.threads else "")
               + (f" --slices {args.slices}" if args.slices else "") + "".join(f" --backend {b}" for b in args.backend or []))
    header = ("| stopping rule | variant | backend | engine | params | GMACs / iteration | mean iterations | slices on cap | "
              "max final residual | PSNR dB | ms / slice | speed-up | per-iteration speed-up | efficiency |")
    lines = [f"Paper-size DEQ, {len(slices)} test slices of 160x160, acceleration 6, Anderson; {args.repeats} interleaved "
             f"rounds; {AGGREGATION}; efficiency = per-iteration speed-up / MAC ratio. Device: {device}. Command: `{command}`.",
             "", header, "|" + "---|" * 14]
    for r in rows:
        lines.append(f"| {r['rule']} | {r['variant']} | {r['backend']} | {r['engine']} | {r['params']:,} | "
                     f"{r['macs_per_iteration'] / 1e9:.2f} | {r['iterations']:.1f} | {r['slices_on_cap']}/{len(slices)} | "
                     f"{r['final_residual']:.1e} | {r['psnr']:.2f} | {r['latency_ms']:.0f} | x{r['speedup_vs_unpruned_torch']:.2f} | "
                     f"x{r['per_iteration_speedup']:.2f} | {r['efficiency']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_text(args.out / "paper-deq-cpu.md", text)
    write_json(args.out / "paper-deq-cpu.json", {"device": device, "command": command, "aggregation": AGGREGATION,
                                                 "slices": [s[2] for s in slices], "backends": backends,
                                                 "ratio": args.ratio, "repeats": args.repeats, "denoiser_steps": args.steps, "crop": args.crop,
                                                 "deq_steps": args.deq_steps, "deq_lr": args.deq_lr,
                                                 "lipschitz_target": args.lipschitz_target,
                                                 "prune_report_params": [report.params_before, report.params_after], "rows": rows})


if __name__ == "__main__":
    main()
