"""Precision as a measured engine dimension: a fixed-point model iterates in low precision until its
residual nears that precision's floor, then in FP32 to the tolerance (the FP32 stopping rule and
fixed point); ``auto`` picks the schedule only where whole solves are faster here; an unrolled model
takes low precision only within a quality bound on a validation split."""

import sys
from pathlib import Path

import pytest
import torch

from spade_deploy.checkpoint import load_model
from spade_deploy.deploy import engines as E
from spade_deploy.deploy.runtime import check_unrolled_precision, deploy
from spade_deploy.errors import SpadeError
from spade_deploy.models import WEIGHTS_DIR, build_model
from spade_deploy.solvers import PrecisionSchedule, SolverConfig, current_precision, solve
from spade_deploy.tasks import task_for


@pytest.fixture(autouse=True)
def _fresh_timings(monkeypatch):
    monkeypatch.setattr(E, "_TIMED", {})


def _traced_affine(rates, trace):
    """``T(x) = a * x + b`` per sample; in the schedule's low phase computed in bf16 with a relative
    error of 1e-3 drawn afresh each call, as a low-precision prior's rounding (its residual floors
    near 1e-3); every call recorded as (phase, sample indices, x, T(x))."""
    a = torch.tensor(rates).view(-1, 1)
    b = torch.linspace(1, 2, 64).view(1, -1)
    g = torch.Generator().manual_seed(0)

    def T(x, idx=None):
        aa = a if idx is None else a[idx]
        low = current_precision()
        if low == "bf16":
            out = (aa.bfloat16() * x.bfloat16() + b.bfloat16()).float()
            out = out * (1 + 1e-3 * torch.randn(out.shape, generator=g))
        else:
            out = aa * x + b
        trace.append((low, list(range(len(rates))) if idx is None else idx.tolist(), x.clone(), out.clone()))
        return out

    return T, b / (1 - a)


def _per_sample(trace, n):
    """Each sample's sequence of (phase, relative residual), in call order."""
    seqs = [[] for _ in range(n)]
    for low, idx, x, fx in trace:
        r = (fx - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)
        for row, s in enumerate(idx):
            seqs[s].append((low, float(r[row])))
    return seqs


@pytest.mark.parametrize("method", ["fixed-point", "anderson"])
def test_each_sample_switches_at_the_stated_residual_and_reaches_the_fp32_fixed_point(method):
    rates, tol, switch = [0.5, 0.85], 1e-6, 1e-2
    trace = []
    T, x_star = _traced_affine(rates, trace)
    cfg = SolverConfig(method=method, max_iter=500, tol=tol, precision=PrecisionSchedule("bf16", switch))
    x, info = solve(T, torch.zeros(2, 64), cfg)
    assert bool(info.converged.all()) and info.precision == "bf16->fp32 @ 0.01"
    for s, seq in enumerate(_per_sample(trace, 2)):
        phases = [p for p, _ in seq]
        n_low = phases.count("bf16")
        # the low phase first, FP32 after; both counted
        assert phases == ["bf16"] * n_low + [None] * (len(seq) - n_low) and n_low >= 1
        assert int(info.low_precision_iterations[s]) == n_low and int(info.iterations[s]) == len(seq)
        # it hands over at the first residual under the switch point, not before
        assert all(r >= switch for _, r in seq[: n_low - 1]) and seq[n_low - 1][1] < switch
        # and stops on an FP32 residual under the tolerance
        assert seq[-1][0] is None and seq[-1][1] < tol
    # FP32's fixed point: within tol / (1 - a) of it (the distance a residual under tol allows),
    # as close as an FP32 solve gets
    x_fp32, _ = solve(T, torch.zeros(2, 64), SolverConfig(method=method, max_iter=500, tol=tol))
    bound = torch.tensor([tol / (1 - a) for a in rates]) * 2
    rel = lambda u: ((u - x_star).norm(dim=1) / x_star.norm(dim=1))  # noqa: E731
    assert (rel(x) <= bound).all() and (rel(x_fp32) <= bound).all()
    # while bf16 alone floors far above that tolerance
    _, alone = solve(T, torch.zeros(2, 64), SolverConfig(method=method, max_iter=60, tol=tol,
                                                        precision=PrecisionSchedule("bf16", 1e-12, stall=60)))
    assert not bool(alone.converged.any()) and (alone.low_precision_iterations == 60).all()
    assert (alone.residual > 1e-4).all()


def test_a_low_phase_that_stalls_above_its_switch_point_hands_over():
    """A switch point under bf16's floor is never reached: the stall rule hands over to FP32 after
    ``stall`` iterations without a 10 % gain, long before the cap."""
    trace = []
    T, _ = _traced_affine([0.5, 0.85], trace)
    cfg = SolverConfig(method="anderson", max_iter=500, tol=1e-6, precision=PrecisionSchedule("bf16", 1e-5, stall=4))
    _, info = solve(T, torch.zeros(2, 64), cfg)
    assert bool(info.converged.all())
    assert (info.low_precision_iterations < 60).all() and (info.iterations < 100).all()
    for seq in _per_sample(trace, 2):  # every low-precision residual stayed above the switch point: the stall rule handed over
        assert all(r >= 1e-5 for p, r in seq if p == "bf16")


def test_device_resident_schedule_reaches_the_same_fixed_point():
    trace = []
    T, x_star = _traced_affine([0.5, 0.85], trace)
    cfg = SolverConfig(max_iter=500, tol=1e-6, resident=True, check_every=4, precision=PrecisionSchedule("bf16", 1e-2))
    x, info = solve(T, torch.zeros(2, 64), cfg)
    assert info.resident and bool(info.converged.all()) and (info.low_precision_iterations >= 1).all()
    assert ((x - x_star).norm(dim=1) / x_star.norm(dim=1) <= 2e-6 / 0.15).all()


def _deq_small():
    model, _ = load_model(WEIGHTS_DIR / "deq-small.safetensors")
    return model.eval()


def test_the_deployed_deq_runs_the_schedule_and_says_so():
    """The shipped small DEQ with ``precision="bf16"``: every sample converged at the FP32 tol,
    some iterations in bf16, the FP32 fixed point within tol / (1 - ||J_T||) (||J_T|| < 0.96), and
    the labels say what ran."""
    model = _deq_small()
    y, physics = task_for(model).synthetic_sample(32, 32)
    y = torch.cat([y, 0.5 * y])
    physics = physics.select(torch.tensor([0, 0]))
    deployed = deploy(model, "torch", precision="bf16")
    with torch.no_grad():
        ref, out = model(y, physics), deployed(y, physics)
    info = deployed.solve_info()
    assert bool(info.converged.all()) and (info.low_precision_iterations >= 1).all()
    assert deployed.precision == "bf16->fp32 @ 0.005" and deployed.engine_label == "eager NCHW bf16->fp32"
    assert model.engine_label == "eager NCHW fp32" and model.precision == "fp32"
    rel = float((out - ref).norm() / ref.norm())
    assert rel <= 2 * model.solver_cfg.tol / (1 - 0.96), rel


def _fake(costs_ms, clock):
    """Engines that advance a fake clock by their cost per prior call (the low-precision one
    computes in FP32 here: only its cost differs)."""

    class Timed(torch.nn.Module):
        def __init__(self, module, ms):
            super().__init__()
            self.module, self.ms = module, ms

        def forward(self, x):
            clock[0] += self.ms / 1000
            return self.module(x)

    def builder(name, prior, device, manifest, entry, root):
        return Timed(E.build_engine("torch", prior, device), costs_ms[name])

    return builder


@pytest.mark.parametrize("bf16_ms, chosen", [(3.0, False), (2.0, False), (0.2, True)])
def test_a_precision_that_slows_the_device_down_is_never_chosen(bf16_ms, chosen):
    """Whole solves decide, timed on an injected clock: a bf16 prior slower than FP32, or no faster
    (the schedule's restart then costs iterations), leaves the deployment in FP32."""
    model = _deq_small()
    sample = task_for(model).synthetic_sample(24, 24)
    costs = {"torch": 2.0, "torch-bf16": bf16_ms}
    clock = [0.0]
    sel = E.select_engines(model, sample, engines=["torch"], rounds=2, loop_iterations=1, timer=lambda: clock[0],
                           builder=_fake(costs, clock), precisions=["bf16"])
    rec = sel.record("prior")
    trial, fp32 = rec["precision_trials"]["bf16->fp32 @ 0.005"], rec["precision_trials"]["fp32"]
    assert trial["status"] == "ok" and trial["low_precision_iterations"] > 0
    # the clock sees every prior call: a solve costs its iterations at each phase's price
    assert fp32["solve_ms"] == pytest.approx(2.0 * fp32["iterations"])
    expect = bf16_ms * trial["low_precision_iterations"] + 2.0 * (trial["iterations"] - trial["low_precision_iterations"])
    assert trial["solve_ms"] == pytest.approx(expect)
    assert (rec["precision"] != "fp32") == chosen == (trial["solve_ms"] < E.MIN_GAIN * fp32["solve_ms"])
    assert rec["engine_label"] == ("channels-last bf16->fp32" if chosen else "channels-last fp32")
    if not chosen:
        assert "not faster here" in trial["note"]



def test_a_reused_engine_timing_decides_the_precision_on_each_models_weights(monkeypatch):
    """Fine-tunings of one pruned architecture share its engine timing (speed depends on the
    widths), but a schedule's gain depends on the iteration counts, hence on the weights: the
    second model's precision is tried on its own solves, not borrowed from the first."""
    a = _deq_small()
    b = _deq_small()
    with torch.no_grad():
        for p in b.priors()["prior"].parameters():
            p.mul_(0.9)
    sample = task_for(a).synthetic_sample(26, 26)  # a size no other test times (the timings are cached)
    clock = [0.0]
    measure = dict(engines=["torch"], rounds=2, loop_iterations=1, timer=lambda: clock[0],
                   builder=_fake({"torch": 2.0, "torch-bf16": 0.2}, clock), precisions=["bf16"])
    tried = []
    choose = E._choose_precision

    def spy(sel, model, *args):
        tried.append(model)
        return choose(sel, model, *args)

    monkeypatch.setattr(E, "_choose_precision", spy)
    da = E.deploy_auto(a, None, "cpu", sample=sample, **measure)
    db = E.deploy_auto(b, None, "cpu", sample=sample, **measure)
    assert [m is a for m in tried] == [True, False] and tried[1] is b
    assert da.precision == db.precision == "bf16->fp32 @ 0.005"  # bf16 10x cheaper on the injected clock

def test_auto_deploys_the_recorded_schedule(tmp_path):
    from spade_deploy.deploy.export import export_onnx

    model = _deq_small()
    mpath = export_onnx(model, tmp_path / "engines", "deq").manifest_path
    import json

    manifest = json.loads(mpath.read_text())
    manifest["priors"][0][E.RECORD_KEY] = [{"device": E.describe_device("cpu"), "shape": [1, 2, 24, 24], "winner": "torch",
                                            "precision": "bf16->fp32 @ 0.005",
                                            "schedule": {"low": "bf16", "switch": 0.005, "stall": 5}}]
    mpath.write_text(json.dumps(manifest))
    deployed = deploy(model, "auto", mpath, shape=(24, 24), precision="auto")
    assert deployed.engine_choice == {"prior": "torch"} and deployed.engine_label == "channels-last bf16->fp32"
    as_fp32 = deploy(model, "auto", mpath, shape=(24, 24), precision="fp32")
    assert as_fp32.engine_label == "channels-last fp32" and as_fp32.precision == "fp32"
    y, physics = task_for(model).synthetic_sample(24, 24)
    with torch.no_grad():
        deployed(y, physics)
    assert int(deployed.solve_info().low_precision_iterations[0]) > 0 and bool(deployed.solve_info().converged.all())


class _Noisy(torch.nn.Module):
    """An unrolled model's output with a relative error added: what a precision that hurts quality gives."""

    def __init__(self, model, noise):
        super().__init__()
        self.model, self.noise, self.solver_cfg = model, noise, None

    def forward(self, y, physics):
        out = self.model(y, physics)
        g = torch.Generator().manual_seed(0)
        return out + self.noise * out.abs().amax() * torch.randn(out.shape, generator=g, dtype=out.real.dtype)

    def solve_info(self):
        return None


def test_an_unrolled_model_in_low_precision_is_accepted_within_the_bound_refused_beyond(tiny_dataset):
    from spade_deploy.mri import reader

    torch.manual_seed(0)
    model = build_model("varnet", preset="tiny").eval()
    task = task_for(model)
    val = reader.SliceDataset(Path(tiny_dataset.root) / "val")
    same = check_unrolled_precision(model, task, val, "bf16", low_model=model)
    assert same.accepted and same.psnr_change == 0 and "accepted" in same.reason
    worse = check_unrolled_precision(model, task, val, "bf16", low_model=_Noisy(model, 0.05))
    assert not worse.accepted and worse.reason.startswith("bf16 refused: PSNR") and worse.psnr_change < -0.05
    # deploy with the validation split: checked there, and applied only within the bound
    deployed = deploy(model, "torch", precision="bf16", validation=(task, val))
    assert deployed.engine_label == "channels-last bf16" and "accepted" in deployed.precision_check
    # asked for without that check, it is refused with the reason, never applied silently
    with pytest.raises(SpadeError, match="unrolled model: bf16 changes its output"):
        deploy(model, "torch", precision="bf16")
    with pytest.raises(SpadeError, match="unknown precision"):
        deploy(model, "torch", precision="int4")


def test_the_cli_takes_a_precision_and_refuses_what_it_cannot_run(tmp_path, tiny_dataset):
    """``spade reconstruct --precision``: a fixed-point model runs the schedule; a bad value and an
    unrolled model in bf16 (no validation check at hand) end on one ``error:`` line."""
    import subprocess

    import h5py

    from spade_deploy.checkpoint import save_model

    spade = str(Path(sys.executable).parent / "spade")
    src = Path(tiny_dataset.root) / "test"
    f = sorted(src.glob("*.h5"))[0]
    deq = _deq_small()
    ckpt = save_model(tmp_path / "deq.safetensors", deq)
    run = lambda *a: subprocess.run([spade, "reconstruct", *map(str, a)], capture_output=True, text=True)  # noqa: E731
    ok = run(ckpt, f, "-o", tmp_path / "bf16", "-b", "torch", "--precision", "bf16", "--engines", tmp_path / "engines")
    assert ok.returncode == 0, ok.stderr + ok.stdout
    assert "precision: bf16->fp32 @ 0.005" in ok.stdout
    with h5py.File(tmp_path / "bf16" / f.name) as h:
        assert bool(h["converged"][()].all())
    # the refusals, in process (each a one-line error, no traceback)
    from typer.testing import CliRunner

    from cli.main import app

    cli = lambda *a: CliRunner().invoke(app, ["reconstruct", *map(str, a)])  # noqa: E731
    bad = cli(ckpt, f, "-o", tmp_path / "x", "--precision", "int4")
    assert bad.exit_code != 0 and "error: unknown precision 'int4'" in bad.output and "Traceback" not in bad.output
    torch.manual_seed(0)
    varnet = save_model(tmp_path / "varnet.safetensors", build_model("varnet", preset="tiny"))
    refused = cli(varnet, f, "-o", tmp_path / "v", "-b", "torch", "--precision", "bf16")
    assert refused.exit_code != 0 and "unrolled model: bf16 changes its output" in refused.output
    assert "Traceback" not in refused.output
