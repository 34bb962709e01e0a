"""Record the MRI results a refactor must leave unchanged (tests/test_task_seam.py compares with them).

``python tests/golden/record_mri.py record tests/golden`` builds the tiny simulated dataset (seed 0),
then per model: evaluate() on the test split (PSNR / SSIM / NMSE per volume and overall, iterations)
and a two-step fit() per strategy (supervised on train; school and self-supervised on the test
measurements with their fixed masks). It writes ``mri.json`` (the scores, the fits' histories and
the tolerances they are compared with) and ``mri-updates.safetensors`` (what each fit changed in the
weights, per tensor, in bfloat16). ``... check tests/golden`` runs the same and prints, per kind of
value, the largest difference from the recorded as a fraction of its tolerance; ``--change
center-fraction`` or ``--change l1-loss`` first makes a real change (another sampling mask, another
loss), which must fail.

VarNet and E2E-VarNet start untrained (tiny presets; the school student from other weights than its
teacher). The DEQ starts from the shipped small base, a trained DEQ whose solves stop on the
tolerance: an untrained DEQ does not converge, and on its cap the end point of 100 Anderson steps
moves by whole dB with the round-off of the CPU's FFT and BLAS kernels, so no tolerance could compare
it. Its fits use a fine-tuning rate (5e-5) that keeps it converging. Re-record after replacing the
shipped base. Recorded on one thread (torch and the BLAS under ESPIRiT).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import torch

GOLDEN_CONFIG = dict(train_volumes=2, train_slices=2, val_volumes=1, val_slices=1, test_volumes=1, test_slices=2,
                     size=48, n_coils=8)
DEQ_LR = 5e-5

# Measured with ``check`` (module docstring) under OPENBLAS_CORETYPE=Haswell / SkylakeX,
# MKL_ENABLE_INSTRUCTIONS=AVX2, and ATEN_CPU_CAPABILITY=avx2 with ONEDNN_MAX_CPU_ISA=AVX2, each on
# 1 and 2 threads (a Xeon with AVX-512, torch 2.13.0+cpu): every value within 0.15 of its tolerance.
# The two ``--change`` runs move 17 % or more of every fit's weights (17 times that tolerance) and a
# training loss by over 800 times its tolerance.
TOLERANCE = {
    # evaluate()'s scores before any training: drift at most 2.1e-6 relative (the NMSE).
    "eval": {"rel": 5e-5},
    # the fits' losses and validation scores: drift at most 1.5e-4 relative. Adam's first step
    # moves each weight by the rate times the sign of its gradient, and a few gradients within
    # round-off of zero flip sign between kernels.
    "fit": {"rel": 1e-3},
    # each fit's weight update: at most this fraction of the weights ends more than ``step`` times
    # the update's RMS from the recorded one. Drift: those sign flips, at most 0.11 % of the weights
    # (18 of an E2E-VarNet's 16552); the changes moved 17 % or more of every fit's weights.
    "weights": {"fraction": 0.01, "step": 0.5},
    # DEQ iteration counts and converged flags are compared exactly: every solve of the record stops
    # at least 5.1 % under its tolerance, the iteration before at least 4.5 % over it, and these
    # residuals drift by 2e-4 relative or less. max_residual (drift 3.5e-5 relative) at 1e-3.
    "residual": {"rel": 1e-3},
}


def start_model(name: str, seed: int = 0) -> torch.nn.Module:
    if name == "deq":
        from spade_deploy.checkpoint import load_model
        from spade_deploy.models import bundled_path

        return load_model(bundled_path("deq", "small"))[0]
    from spade_deploy.models import build_model

    torch.manual_seed(seed)
    return build_model(name, preset="tiny")


def record(root: Path, work: Path, models=("deq", "varnet", "e2e-varnet")) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(scores and histories, {"model/strategy/tensor": the fit's update of that tensor})``."""
    from spade_deploy.mri import reader, simulate
    from spade_deploy.losses import STRATEGIES
    from spade_deploy.mri.task import MRITask
    from spade_deploy.train import TrainConfig, evaluate, fit
    from spade_deploy.mri.deq import DEQTrainOptions

    simulate.build_default_dataset(root, seed=0, config=simulate.SimConfig(**GOLDEN_CONFIG))
    train, val, test = (reader.SliceDataset(root / s) for s in ("train", "val", "test"))
    out: dict = {"torch": torch.__version__, "threads": 1, "tolerance": TOLERANCE, "models": {}}
    updates: dict[str, torch.Tensor] = {}
    for name in models:
        teacher = start_model(name)
        res = evaluate(teacher, test, MRITask(6), batch_size=2)
        entry = {"eval": {"psnr": res.psnr, "ssim": res.ssim, "nmse": res.nmse, "psnr_zero_filled": res.psnr_zero_filled,
                          "psnr_sense": res.psnr_sense, "mean_iterations": res.mean_iterations,
                          "max_residual": res.max_residual, "per_volume": res.per_volume}, "fit": {}}
        for strategy, loss_cls in STRATEGIES.items():
            student = start_model(name, seed=1 if loss_cls.needs_teacher else 0)
            before = {k: v.detach().clone() for k, v in student.state_dict().items()}
            deq = name == "deq"
            options = DEQTrainOptions(train_max_iter=10, lipschitz_weight=0.1, lipschitz_target=0.96, pretrain_lr=DEQ_LR,
                                      pretrain_steps=2 if strategy == "supervised" else 0) if deq else None
            cfg = TrainConfig(epochs=1, lr=DEQ_LR if deq else 1e-3, batch_size=2, max_steps_per_epoch=2,
                              fixed_masks=strategy != "supervised", model_options=options)
            ds = train if strategy == "supervised" else test
            torch.manual_seed(0)
            fr = fit(student, loss_cls(), ds, val, cfg, work / f"{name}-{strategy}", checkpoint_seconds=None,
                     teacher=teacher if loss_cls.needs_teacher else None)
            entry["fit"][strategy] = {"history": fr.history}
            updates.update({f"{name}/{strategy}/{k}": v.detach() - before[k]
                            for k, v in student.state_dict().items() if v.is_floating_point()})
        out["models"][name] = entry
    return out, updates


def compare(got: dict, updates: dict[str, torch.Tensor], want: dict, want_updates: dict[str, torch.Tensor]) -> dict:
    """Per kind of value, ``(largest difference as a fraction of its tolerance, where)``: a fraction
    above 1 is a failure. Floats relative to their size (``eval`` before any training, ``fit`` in
    the fits' histories, ``residual`` for the DEQ's last residual); iteration counts, flags and
    everything else equal (``exact``: 0 or inf); ``weights``: the fraction of a fit's weights whose
    update ends more than ``step`` times the update's RMS from the recorded one."""
    tol = want["tolerance"]
    worst = {"exact": (0.0, "")}

    def note(kind: str, fraction: float, where: str) -> None:
        if fraction >= worst.get(kind, (-1.0, ""))[0]:
            worst[kind] = (fraction, where)

    def walk(g, w, where: str) -> None:
        if isinstance(w, dict) and isinstance(g, dict) and set(g) == set(w):
            for k in w:
                walk(g[k], w[k], f"{where}/{k}")
        elif isinstance(w, list) and isinstance(g, list) and len(g) == len(w):
            for i, (a, b) in enumerate(zip(g, w)):
                walk(a, b, f"{where}[{i}]")
        elif isinstance(w, float) and isinstance(g, float) and not where.endswith("iterations"):
            kind = "residual" if where.endswith("residual") else "fit" if "/fit/" in where else "eval"
            rel = abs(g - w) / abs(w) if w else (0.0 if g == w else math.inf)
            note(kind, rel / tol[kind]["rel"] if math.isfinite(rel) else math.inf, f"{where}: {g!r} vs {w!r}")
        elif g != w:
            note("exact", math.inf, f"{where}: {g!r} vs {w!r}")

    walk(got["models"], want["models"], "")
    if set(updates) != set(want_updates):
        note("exact", math.inf, f"updated tensors: {sorted(set(updates) ^ set(want_updates))}")
        return worst
    w = tol["weights"]
    for fit, moved in moved_fractions(updates, want_updates, w["step"]).items():
        note("weights", moved / w["fraction"], f"{fit}: {moved:.3%} of its weights moved otherwise than recorded")
    return worst


def moved_fractions(updates: dict[str, torch.Tensor], want_updates: dict[str, torch.Tensor], step: float) -> dict:
    """Per fit, the fraction of its weights whose update ends more than ``step`` times the recorded
    update's RMS from the recorded one (all when the recorded fit changed nothing)."""
    out = {}
    for fit in sorted({k.rsplit("/", 1)[0] for k in want_updates}):
        keys = sorted(k for k in want_updates if k.startswith(fit + "/"))
        d = torch.cat([updates[k].flatten().double() for k in keys])
        d_want = torch.cat([want_updates[k].flatten().double() for k in keys])
        rms = float(d_want.pow(2).mean().sqrt())
        out[fit] = float((~((d - d_want).abs() <= step * rms)).double().mean()) if rms > 0 else 1.0  # NaN: moved
    return out


def run(work: Path | None = None, threads: int = 1) -> tuple[dict, dict[str, torch.Tensor]]:
    """:func:`record` as recorded: on ``threads`` threads (torch and the BLAS), its files in ``work``
    (a temporary folder when None), the results as JSON reads them back."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(dir=work) as tmp, threadpool_limits(threads):
            result, updates = record(Path(tmp) / "data", Path(tmp) / "runs")
    finally:
        torch.set_num_threads(before)
    return json.loads(json.dumps(result, default=float)), updates


def make_change(name: str) -> None:
    """A real change the comparison must catch: ``center-fraction`` samples 10 % of the k-space
    centre instead of 8 %; ``l1-loss`` makes the losses' relative squared error a relative L1 error."""
    import spade_deploy.losses as losses
    from spade_deploy.mri.task import MRITask

    if name == "center-fraction":
        MRITask.__init__.__defaults__ = (6, 0.1, "espirit", None)
    elif name == "l1-loss":
        def relative_l1(x, ref, scale=None):
            b = x.shape[0]
            num = (x - ref).abs().reshape(b, -1).sum(1)
            den = ref.abs().reshape(b, -1).sum(1) if scale is None else scale.to(num).sqrt()
            return (num / den.clamp_min(1e-12)).mean()

        losses.relative_sq_error = relative_l1
    else:
        raise SystemExit(f"error: unknown change {name!r} (center-fraction | l1-loss)")


def main() -> None:
    from safetensors.torch import load_file, save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("record", "check"))
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=1, help="check: threads to run on (recorded on 1)")
    ap.add_argument("--change", help="check: center-fraction | l1-loss (a real change, which must fail)")
    args = ap.parse_args()
    if args.change:
        make_change(args.change)
    if args.action == "record":
        result, updates = run()
        (args.folder / "mri.json").write_text(json.dumps(result, indent=1) + "\n")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sorted(updates.items())},
                  str(args.folder / "mri-updates.safetensors"))
        print(json.dumps({k: {"psnr": v["eval"]["psnr"], "it": v["eval"]["mean_iterations"]}
                          for k, v in result["models"].items()}))
        return
    result, updates = run(threads=args.threads)
    want = json.loads((args.folder / "mri.json").read_text())
    want_updates = load_file(args.folder / "mri-updates.safetensors")
    worst = compare(result, updates, want, want_updates)
    moved = moved_fractions(updates, want_updates, want["tolerance"]["weights"]["step"])
    print("weights moved otherwise than recorded:", ", ".join(f"{k} {v:.3%}" for k, v in moved.items()))
    for kind, (fraction, where) in worst.items():
        print(f"{kind:9s} {fraction:9.3g} of its tolerance at {where}")
    print("FAIL" if any(f > 1 for f, _ in worst.values()) else "pass")


if __name__ == "__main__":
    main()
