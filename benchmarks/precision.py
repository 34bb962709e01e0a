"""Precision as a measured choice on this CPU: the DEQ's bf16 -> fp32 schedule against FP32 of the same
widths on the embedded test split, and unrolled models (VarNet, E2E-VarNet, USRNet) in bf16 against
FP32 on their validation split.

    OMP_NUM_THREADS=1 python benchmarks/precision.py --threads 1 \\
        [--deq CKPT ...] [--varnet CKPT] [--e2e-varnet CKPT] [--usrnet CKPT] [--repeats 3]

(a) Each DEQ (default: the shipped ``deq-small``) is deployed on the channels-last engine in FP32 and
with the precision schedule of :data:`spade_deploy.deploy.engines.SWITCH_RESIDUAL` (bf16 priors
until a slice's residual falls under the switch point, or stalls, then FP32 to the model's tol with
the Anderson history restarted). Reported: every slice converged at the FP32 tol, PSNR / SSIM of
both on the test split (the task's evaluation), their difference (bound: 0.01 dB), mean iterations
(total and in bf16), and the speed-up: every test slice solved by both, interleaved in rounds
(:func:`spade_deploy.bench.time_interleaved`; latency: median over rounds per slice, mean over
slices). Unless ``--no-sweep``, the first DEQ is also timed with other switch points in the
same rounds: the measurement the default switch point was chosen by. The bf16 prior's residual
floor is measured on the first slices (:func:`spade_deploy.deploy.runtime.check_precision`, the
prior alone in bf16 to the cap).

(b) Each unrolled model runs its validation split in FP32 and with its priors in bf16
(:func:`spade_deploy.deploy.runtime.check_unrolled_precision`): accepted where PSNR falls by at most
0.05 dB and SSIM by at most 0.001, else refused with the reason; the speed-up is timed alike on the
test split. VarNet / E2E-VarNet: ``--varnet`` / ``--e2e-varnet`` checkpoints (e.g. ``spade train -m
varnet --preset small``), else the untrained small preset (seed 0, stated in the table).

The instruction set is recorded twice: the CPU's flags (:func:`spade_deploy.deploy.priors.cpu_isa`)
and oneDNN's own report of the ISA and the convolution kernel a bf16 prior call ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
from pathlib import Path

import torch

from spade_deploy.bench import AGGREGATION, bench_slices, time_interleaved
from spade_deploy.checkpoint import load_model
from spade_deploy.deploy.engines import SWITCH_RESIDUAL, apply_precision, build_engine
from spade_deploy.deploy.priors import CastPrior, cpu_isa, low_precision_support
from spade_deploy.deploy.runtime import MAX_PSNR_LOSS_DB, MAX_SSIM_LOSS, check_precision, check_unrolled_precision
from spade_deploy.io import write_json, write_text
from spade_deploy.models import WEIGHTS_DIR, build_model
from spade_deploy.solvers import PrecisionSchedule
from spade_deploy.tasks import task_for

MAX_DEQ_PSNR_CHANGE = 0.01  # dB: the schedule must give the FP32 deployment's quality
SWEEP = (1e-2, 5e-3, 3e-3, 2e-3)


def onednn_report(fn) -> tuple[str, str]:
    """oneDNN's ISA line and the convolution kernels ``fn`` ran (its verbose output, read from fd 1)."""
    with tempfile.TemporaryFile(mode="w+") as tmp:
        saved = os.dup(1)
        os.dup2(tmp.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        tmp.seek(0)
        lines = tmp.read().splitlines()
    isa = next((ln.split("isa:", 1)[1] for ln in lines if ",isa:" in ln), "not reported")
    kernels = sorted({ln.split(",")[6] for ln in lines if ",exec,cpu,convolution," in ln})
    return isa, ", ".join(kernels) or "none reported"


def channels_last(model):
    """``model`` with its priors on the channels-last engine (FP32): the widths' own FP32 deployment."""
    net = copy.deepcopy(model).eval()
    for name, prior in model.priors().items():
        net.set_prior(name, build_engine("torch", prior.eval(), "cpu"))
    return net


def timed(models, slices, repeats, warmup):
    out = time_interleaved(models, slices, warmup + repeats)
    for t in out:  # the warm-up rounds are dropped
        t.seconds = [s[warmup:] for s in t.seconds]
    return out


def deq_rows(name, model, task, root, args, sweep):
    test = task.dataset(root, "test")
    slices = bench_slices(test, task, torch.device("cpu"))[: args.slices]
    floors = [check_precision(model, y, p, "bf16", raise_on_failure=False).final_residual[0] for y, p, _ in slices[:2]]
    full = channels_last(model)
    variants = {"fp32": full}
    for sw in (sweep if sweep else (SWITCH_RESIDUAL["bf16"],)):
        sched = PrecisionSchedule("bf16", sw)
        variants[sched.label] = apply_precision(copy.deepcopy(full), model, sched)
    labels = list(variants)
    times = timed([variants[k] for k in labels], slices, args.repeats, args.warmup)
    low_iters = {}
    for k in labels:  # the bf16 iterations of each slice (a pass outside the timing)
        n = []
        with torch.no_grad():
            for y, p, _ in slices:
                variants[k](y, p)
                info = variants[k].solve_info()
                n.append(float(info.low_precision_iterations.sum()) if info.low_precision_iterations is not None else 0.0)
        low_iters[k] = sum(n) / len(n)
    scores = {k: task.evaluate(variants[k], test, batch_size=1) for k in labels}
    rows = []
    for k, t in zip(labels, times):
        s = scores.get(k)
        rows.append({
            "model": name, "precision": k, "engine_label": f"channels-last {k.split(' @ ')[0]}",
            "latency_ms": t.latency_ms, "speedup": times[0].latency_ms / t.latency_ms,
            "mean_iterations": sum(t.iterations) / len(t.iterations), "mean_bf16_iterations": low_iters[k],
            "slices_converged": f"{len(t.on_cap) - sum(t.on_cap)}/{len(t.on_cap)}",
            "psnr": s.psnr if s else None, "ssim": s.ssim if s else None,
            "psnr_change": (s.psnr - scores["fp32"].psnr) if s else None,
            "ssim_change": (s.ssim - scores["fp32"].ssim) if s else None,
            "eval_all_converged": s.all_converged if s else None,
            "n_slices": len(slices), "bf16_floor": max(floors), "tol": model.solver_cfg.tol,
        })
    return rows


def unrolled_row(name, model, task, root, args, note):
    val = task.dataset(root, "val")
    check = check_unrolled_precision(model, task, val, "bf16")
    slices = bench_slices(task.dataset(root, "test"), task, torch.device("cpu"))[: args.slices]
    low = copy.deepcopy(model).eval()
    for n, prior in model.priors().items():
        low.set_prior(n, CastPrior(prior, "bf16"))
    t32, t16 = timed([channels_last(model), low], slices, args.repeats, args.warmup)
    return {"model": name, "weights": note, "precision": "bf16" if check.accepted else "fp32 (bf16 refused)",
            "psnr_fp32": check.psnr_fp32, "psnr_bf16": check.psnr_low, "psnr_change": check.psnr_change,
            "ssim_fp32": check.ssim_fp32, "ssim_bf16": check.ssim_low, "ssim_change": check.ssim_change,
            "val_slices": check.n_slices, "accepted": check.accepted, "reason": check.reason,
            "latency_fp32_ms": t32.latency_ms, "latency_bf16_ms": t16.latency_ms,
            "speedup": t32.latency_ms / t16.latency_ms, "timed_slices": len(slices)}


def load_or_build(path, name, preset):
    if path:
        model, _ = load_model(path)
        return model.eval(), str(path)
    torch.manual_seed(0)
    return build_model(name, preset=preset).eval(), f"untrained {preset} preset (seed 0)"


def render(data: dict) -> str:
    """The Markdown table of a result (``--render`` re-renders a written JSON)."""
    env, cmd, deq, unrolled = data["environment"], data["command"], data["deq"], data["unrolled"]
    onednn_isa, kernels = env["onednn_isa"], env["bf16_conv_kernel"]
    default = PrecisionSchedule("bf16", SWITCH_RESIDUAL["bf16"]).label
    lines = [f"# Precision on this CPU: {env['cpu']}, {env['threads']} thread(s)", "",
             f"ISA: {env['isa']}; oneDNN: {onednn_isa}; a bf16 3x3 convolution ran `{kernels}`. torch {env['torch']}.",
             "", f"Command: `{cmd}`", "",
             f"## (a) DEQ: bf16 -> fp32 precision schedule against FP32 of the same widths (test split, {AGGREGATION})", "",
             "The schedule: bf16 priors until a slice's relative residual falls under the switch point (or stalls 5 "
             "iterations without a 10 % gain), then FP32 with the Anderson history restarted, to the model's tol; only "
             f"FP32 iterations stop a slice. Default switch point: {SWITCH_RESIDUAL['bf16']:g}. Bound on the PSNR change: "
             f"{MAX_DEQ_PSNR_CHANGE} dB.", "",
             "| model | precision | engine | converged at FP32 tol | mean iterations (bf16) | latency ms | speed-up | "
             "PSNR dB (change) | SSIM (change) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in deq:
        q = (f"{r['psnr']:.3f} ({r['psnr_change']:+.4f})", f"{r['ssim']:.4f} ({r['ssim_change']:+.5f})") if r["psnr"] is not None else ("", "")
        lines.append(f"| {r['model']} | {r['precision']} | {r['engine_label']} | {r['slices_converged']} | "
                     f"{r['mean_iterations']:.2f} ({r['mean_bf16_iterations']:.2f}) | {r['latency_ms']:.1f} | "
                     f"x{r['speedup']:.2f} | {q[0]} | {q[1]} |")
    for m in dict.fromkeys(r["model"] for r in deq):
        r0 = next(r for r in deq if r["model"] == m)
        lines.append("")
        lines.append(f"{m}: bf16 prior alone floors at residual {r0['bf16_floor']:.1e} (tol {r0['tol']:g}).")
    lines += ["", f"The default schedule is `{default}`; rows with other switch points are the sweep it was chosen by "
              "(each scored on the test split too).", ""]
    if unrolled:
        lines += [f"## (b) Unrolled models in bf16 (quality on the validation split, bound -{MAX_PSNR_LOSS_DB} dB PSNR / "
                  f"-{MAX_SSIM_LOSS} SSIM; speed on the test split)", "",
                  "| model | weights | PSNR fp32 -> bf16 (change) | SSIM fp32 -> bf16 (change) | latency fp32 / bf16 ms | "
                  "speed-up | decision |", "|---|---|---|---|---|---|---|"]
        for r in unrolled:
            lines.append(f"| {r['model']} | {r['weights']} | {r['psnr_fp32']:.3f} -> {r['psnr_bf16']:.3f} "
                         f"({r['psnr_change']:+.4f}) | {r['ssim_fp32']:.4f} -> {r['ssim_bf16']:.4f} ({r['ssim_change']:+.5f}) | "
                         f"{r['latency_fp32_ms']:.1f} / {r['latency_bf16_ms']:.1f} | x{r['speedup']:.2f} | {r['reason']} |")
    if data.get("recipe"):
        lines += ["", "The checkpoints were made by:", "", "```", *data["recipe"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--deq", type=Path, action="append", default=None,
                    help="DEQ checkpoints (repeatable; default: the shipped deq-small)")
    ap.add_argument("--varnet", type=Path, default=None)
    ap.add_argument("--e2e-varnet", type=Path, default=None)
    ap.add_argument("--usrnet", type=Path, default=WEIGHTS_DIR / "usrnet-small.safetensors")
    ap.add_argument("--no-sweep", action="store_true", help="time the default switch point only")
    ap.add_argument("--skip-unrolled", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds timed")
    ap.add_argument("--warmup", type=int, default=1, help="interleaved rounds run first, not timed")
    ap.add_argument("--slices", type=int, default=None, help="time the first N test slices only")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--stem", default="precision-cpu")
    ap.add_argument("--recipe", action="append", default=None,
                    help="a command that made a checkpoint given (repeatable; written under the table)")
    ap.add_argument("--render", type=Path, default=None, help="re-render the Markdown of a written JSON, and stop")
    args = ap.parse_args()
    if args.render:
        text = render(json.loads(args.render.read_text()))
        write_text(args.render.with_suffix(".md"), text)
        print(text)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if "bf16" not in low_precision_support("cpu"):
        print(f"note: this CPU ({cpu_isa()}) has no native bf16: the figures show emulated bf16")
    probe = CastPrior(torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1)), "bf16")
    x = torch.randn(1, 32, 64, 64)
    with torch.no_grad():
        probe(x)
        onednn_isa, kernels = onednn_report(lambda: probe(x))
    env = {"cpu": platform.processor() or platform.machine(), "isa": cpu_isa(), "onednn_isa": onednn_isa,
           "bf16_conv_kernel": kernels, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "aggregation": AGGREGATION, "repeats": args.repeats, "warmup": args.warmup,
           "bounds": {"deq_psnr_change_db": MAX_DEQ_PSNR_CHANGE, "unrolled_psnr_loss_db": MAX_PSNR_LOSS_DB,
                      "unrolled_ssim_loss": MAX_SSIM_LOSS}}
    print(env, flush=True)

    deq_paths = args.deq or [WEIGHTS_DIR / "deq-small.safetensors"]
    deq = []
    for i, path in enumerate(deq_paths):
        model, _ = load_model(path)
        task = task_for(model)
        root = task.data_root(None)
        label = path.name if path.parent == WEIGHTS_DIR else f"{path.parent.name}/{path.name}"
        rows = deq_rows(label, model.eval(), task, root, args, SWEEP if i == 0 and not args.no_sweep else None)
        for r in rows:
            print(r, flush=True)
        deq += rows
    unrolled = []
    if not args.skip_unrolled:
        for name, path, preset in (("varnet", args.varnet, "small"), ("e2e-varnet", args.e2e_varnet, "small"),
                                   ("usrnet", args.usrnet, "small")):
            model, note = load_or_build(path, name, preset)
            task = task_for(model)
            row = unrolled_row(name, model, task, task.data_root(None), args, note)
            print(row, flush=True)
            unrolled.append(row)

    cmd = "OMP_NUM_THREADS={t} python benchmarks/precision.py --threads {t}".format(t=env["threads"]) + "".join(
        f" --deq {p}" for p in (args.deq or [])) + (f" --varnet {args.varnet}" if args.varnet else "") + (
        f" --e2e-varnet {args.e2e_varnet}" if args.e2e_varnet else "")
    data = {"environment": env, "command": cmd, "recipe": args.recipe or [], "deq": deq, "unrolled": unrolled}
    text = render(data)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / f"{args.stem}.md", text)
    write_json(args.out / f"{args.stem}.json", data)


if __name__ == "__main__":
    main()
