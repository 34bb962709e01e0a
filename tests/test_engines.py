"""The auto back-end: every engine is checked against PyTorch and timed on this device at the data's
shape, the winner and all timings go into the export manifest, and `auto` deploys what is recorded."""

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from spade_deploy.deploy import engines as E
from spade_deploy.checkpoint import save_model
from spade_deploy.deploy.export import export_onnx
from spade_deploy.models import build_model
from spade_deploy.deploy.priors import OrtPrior
from spade_deploy.deploy.runtime import deploy
from spade_deploy.mri.physics import synthetic_sample

from cli.main import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def _fresh_timings(monkeypatch):
    """Each test starts with no selection made earlier in the process."""
    monkeypatch.setattr(E, "_TIMED", {})


@pytest.fixture()
def exported(tmp_path):
    torch.manual_seed(0)
    model = build_model("deq", preset="tiny").eval()
    return model, export_onnx(model, tmp_path / "engines", "deq").manifest_path


def _record(manifest_path):
    return json.loads(manifest_path.read_text())["priors"][0].get(E.RECORD_KEY)


def test_auto_measures_records_and_matches_pytorch(exported, monkeypatch):
    monkeypatch.setenv(E.ENV_ENGINES, "torch,onnxruntime")
    model, mpath = exported
    y, physics = synthetic_sample(24, 32, coils=4)
    deployed = deploy(model, "auto", mpath, sample=(y, physics))
    (rec,) = _record(mpath)
    assert rec["device"] == E.describe_device("cpu") and rec["shape"] == [1, 2, 24, 32] and rec["data_shape"] == [4, 24, 32]
    assert set(rec["timings_ms"]) == {"torch", "onnxruntime"} and rec["decided_by"] == "loop"
    for eng in ("torch", "onnxruntime"):
        assert rec["engines"][eng]["status"] == "ok"
        assert rec["max_rel_error"][eng] <= 1e-4
    # The record explains the choice: the winner costs least per iteration of the loop, its setup
    # spread over the calls it is amortised over.
    cost = {e: rec["loop_timings_ms"][e] + 1000 * rec["engines"][e]["setup_s"] / rec["amortise_calls"]
            for e in ("torch", "onnxruntime")}
    winner = rec["winner"]
    assert winner == min(cost, key=cost.get), (winner, cost)
    assert deployed.engine_choice == {"prior": winner}
    assert isinstance(deployed.prior, OrtPrior) == (winner == "onnxruntime")
    with torch.no_grad():
        ref, got = model(y, physics), deployed(y, physics)
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-4


def _fake_engines(costs_ms, clock, setup_s=None, broken=(), inaccurate=()):
    """A builder whose engines advance a fake clock by their cost per call (``costs_ms``)."""

    class Timed(nn.Module):
        def __init__(self, module, ms, noise):
            super().__init__()
            self.module, self.ms, self.noise = module, ms, noise

        def forward(self, x):
            clock[0] += self.ms / 1000
            out = self.module(x)
            return out + self.noise * out.abs().max() if self.noise else out

    def builder(name, prior, device, manifest, entry, root):
        if name in broken:
            raise RuntimeError(f"{name} cannot compile here\nsecond line")
        clock[0] += (setup_s or {}).get(name, 0.0)
        return Timed(E.build_engine("torch", prior, device), costs_ms[name], 1e-2 if name in inaccurate else 0.0)

    return builder


def test_the_measured_fastest_engine_wins(exported):
    model, _ = exported
    sample = synthetic_sample(16, 16, coils=2)
    for costs, expect in (({"torch": 1.0, "torch-compile": 3.0}, "torch"), ({"torch": 3.0, "torch-compile": 1.0}, "torch-compile")):
        clock = [0.0]
        sel = E.select_engines(model, sample, engines=list(costs), rounds=3, loop_iterations=2,
                               timer=lambda: clock[0], builder=_fake_engines(costs, clock))
        assert sel.winner == expect
        rec = sel.record("prior")
        assert rec["timings_ms"] == pytest.approx(costs)
        assert rec["loop_timings_ms"] == pytest.approx(costs)  # one prior call per iteration; the rest costs 0 on this clock


def test_setup_that_costs_more_than_its_gain_loses(exported):
    """torch.compile's compilation is paid in every process: spread over the calls it must pay for itself."""
    model, _ = exported
    sample = synthetic_sample(16, 16, coils=2)
    costs = {"torch": 2.0, "torch-compile": 1.0}
    for setup, calls, expect in ((30.0, 1000, "torch"), (30.0, 100_000, "torch-compile")):
        clock = [0.0]
        sel = E.select_engines(model, sample, engines=list(costs), rounds=3, loop_iterations=2, amortise_calls=calls,
                               timer=lambda: clock[0], builder=_fake_engines(costs, clock, {"torch-compile": setup}))
        assert sel.winner == expect
        eng = sel.record("prior")["engines"]["torch-compile"]
        assert eng["setup_s"] == pytest.approx(setup + costs["torch-compile"] / 1000)  # building + the first call
        assert ("costs more than it gains" in eng["note"]) == (expect == "torch")


def test_failing_and_inaccurate_engines_are_recorded_never_chosen(exported):
    model, _ = exported
    sample = synthetic_sample(16, 16, coils=2)
    costs = {"torch": 5.0, "torch-compile": 1.0, "onnxruntime": 0.5}
    clock = [0.0]
    sel = E.select_engines(model, sample, engines=list(costs), rounds=2, loop_iterations=1, timer=lambda: clock[0],
                           builder=_fake_engines(costs, clock, broken=("torch-compile",), inaccurate=("onnxruntime",)))
    assert sel.winner == "torch"
    engines = sel.record("prior")["engines"]
    assert engines["torch-compile"]["status"] == "failed" and "cannot compile here" in engines["torch-compile"]["note"]
    assert "second line" not in engines["torch-compile"]["note"]
    assert engines["onnxruntime"]["status"] == "inaccurate" and engines["onnxruntime"]["max_rel_error"] > 1e-4
    assert engines["onnxruntime"]["prior_ms"] is None


def test_cuda_engines_are_skipped_cleanly_on_cpu(exported):
    model, mpath = exported
    sel = E.select_engines(model, synthetic_sample(16, 16, coils=2), json.loads(mpath.read_text()), mpath.parent,
                           engines=["torch", "cuda-graph", "tensorrt"], rounds=1, loop_iterations=1)
    engines = sel.record("prior")["engines"]
    assert sel.winner == "torch"
    assert engines["cuda-graph"]["status"] == engines["tensorrt"]["status"] == "unavailable"


def _inject(mpath, winner, shape):
    manifest = json.loads(mpath.read_text())
    manifest["priors"][0][E.RECORD_KEY] = [{"device": E.describe_device("cpu"), "shape": shape, "winner": winner}]
    mpath.write_text(json.dumps(manifest))


def test_auto_deploys_the_recorded_winner_without_measuring(exported, monkeypatch):
    model, mpath = exported
    calls = []
    real = E.select_engines
    monkeypatch.setattr(E, "select_engines", lambda *a, **k: calls.append(1) or real(*a, **k))
    _inject(mpath, "onnxruntime", [1, 2, 40, 48])
    assert isinstance(deploy(model, "auto", mpath, shape=(40, 48)).prior, OrtPrior) and not calls
    _inject(mpath, "torch", [1, 2, 40, 48])
    assert isinstance(deploy(model, "auto", mpath, shape=(40, 48)).prior, E.ChannelsLastPrior) and not calls
    # Recorded for another shape: measured for this one, and both records kept.
    deploy(model, "auto", mpath, shape=(24, 24))
    assert calls and [r["shape"] for r in _record(mpath)] == [[1, 2, 40, 48], [1, 2, 24, 24]]


def test_reconstruct_defaults_to_the_recorded_engine(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "deq.safetensors", build_model("deq", preset="tiny"))
    engines = tmp_path / "engines"
    assert runner.invoke(app, ["export", str(ckpt), "-o", str(engines)]).exit_code == 0
    mpath = engines / "deq.manifest.json"
    _inject(mpath, "onnxruntime", [1, 2, 48, 48])  # the tiny dataset's slices are 48 x 48
    src = tiny_dataset.root / "test"
    result = runner.invoke(app, ["reconstruct", str(ckpt), str(src), "-o", str(tmp_path / "auto"), "--engines", str(engines)])
    assert result.exit_code == 0, result.output
    assert "priors on: onnxruntime" in result.output
    # The same reconstructions as forcing that back-end (an untrained DEQ amplifies any other
    # engine's rounding over its 100 iterations, so this compares like with like).
    forced = ["reconstruct", str(ckpt), str(src), "-o", str(tmp_path / "ort"), "-b", "onnxruntime", "--engines", str(engines)]
    assert runner.invoke(app, forced).exit_code == 0
    files = sorted((tmp_path / "ort").glob("*.h5"))
    assert files
    for f in files:
        with h5py.File(f) as a, h5py.File(tmp_path / "auto" / f.name) as b:
            assert np.array_equal(a["reconstruction"][()], b["reconstruction"][()])


def test_unknown_engine_in_the_environment_is_one_line(monkeypatch, exported):
    model, mpath = exported
    monkeypatch.setenv(E.ENV_ENGINES, "torch,turbo")
    with pytest.raises(E.SpadeError, match="unknown engines turbo"):
        deploy(model, "auto", mpath, shape=(16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engines_are_checked_and_timed(exported):
    """On a GPU: the CUDA graph of the eager prior matches PyTorch; onnxruntime / TensorRT run
    where installed (else are skipped), and whatever wins deploys and reconstructs."""
    model, mpath = exported
    sample = synthetic_sample(32, 32, coils=2, device="cuda")
    sel = E.select_engines(model, sample, json.loads(mpath.read_text()), mpath.parent, device="cuda",
                           engines=["torch", "cuda-graph", "onnxruntime", "tensorrt"], rounds=3, loop_iterations=2)
    engines = sel.record("prior")["engines"]
    assert engines["torch"]["status"] == engines["cuda-graph"]["status"] == "ok", engines
    assert engines["cuda-graph"]["max_rel_error"] <= 1e-4
    assert all(engines[e]["status"] != "failed" for e in ("onnxruntime", "tensorrt")), engines
    deployed = E.deploy_auto(model, mpath, "cuda", sample=sample)
    with torch.no_grad():
        assert torch.isfinite(deployed(*sample)).all()


def test_an_engine_that_fails_inside_the_loop_is_recorded_not_chosen(exported):
    """Runs the prior alone, breaks on the loop's input (here: any input but the check's)."""
    model, _ = exported
    sample = synthetic_sample(16, 16, coils=2)
    clock = [0.0]
    costs = {"torch": 2.0, "torch-compile": 1.0}
    inner = _fake_engines(costs, clock)

    class OnlyContiguous(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            if not x.is_contiguous():  # the loop hands the prior channels-last input
                raise RuntimeError("unsupported memory format")
            return self.module(x)

    def builder(name, *args):
        m = inner(name, *args)
        return OnlyContiguous(m) if name == "torch-compile" else m

    sel = E.select_engines(model, sample, engines=list(costs), rounds=2, loop_iterations=1, timer=lambda: clock[0],
                           builder=builder)
    eng = sel.record("prior")["engines"]["torch-compile"]
    assert sel.winner == "torch" and eng["status"] == "failed" and "in the loop" in eng["note"]
    assert eng["prior_ms"] == pytest.approx(1.0)


def test_an_identical_architecture_is_timed_once(tmp_path, monkeypatch):
    """Variants of one architecture (the strategies at one ratio) share its timings; each gets the
    winner checked on its own weights and its own manifest record. Another architecture is timed."""
    calls = []
    real = E.select_engines
    monkeypatch.setattr(E, "select_engines", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    a, b = build_model("deq", preset="tiny"), build_model("deq", preset="tiny")  # same widths, other weights
    small = build_model("deq", config={**build_model("deq", preset="tiny").config.__dict__, "n_feats": 8})
    paths = [export_onnx(m, tmp_path / "e", f"m{i}").manifest_path for i, m in enumerate((a, b, small))]
    kw = dict(shape=(24, 24), engines=["torch", "onnxruntime"], rounds=2, loop_iterations=1)
    da = E.deploy_auto(a, paths[0], **kw)
    db = E.deploy_auto(b, paths[1], **kw)
    assert len(calls) == 1 and db.engine_choice == da.engine_choice
    (rec,) = _record(paths[1])
    assert rec["timed_on"].startswith("an identical architecture") and rec["max_rel_error"][rec["winner"]] <= 1e-4
    with torch.no_grad():
        x = torch.randn(1, 2, 24, 24)
        assert torch.allclose(db.prior(x), b.prior(x), atol=1e-5)  # b's own weights, not a's
    E.deploy_auto(small, paths[2], **kw)
    assert len(calls) == 2


def test_auto_deploys_a_compiled_winner(exported, tmp_path, monkeypatch):
    """A ``torch.compile`` winner is deployed as built (the demo failed when it won: the compiled
    module was truth-tested, and a compiled wrapper has no ``len``) and reproduces PyTorch."""
    import torch._inductor.config as inductor

    cxx = inductor.cpp.cxx if isinstance(inductor.cpp.cxx, (list, tuple)) else (inductor.cpp.cxx,)
    compilers = [c for c in cxx if c]  # $CXX, else g++: what torch.compile's CPU back-end runs
    if not any(shutil.which(c) for c in compilers):
        pytest.skip(f"torch.compile on the CPU needs a C++ compiler: {' or '.join(compilers)}, not found on PATH")
    # Every file of the compilation in the test's folder: the compile cache, and no precompiled
    # headers (~150 MB, which inductor keeps in $TMPDIR whatever its cache folder; no slower here).
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    monkeypatch.setattr(inductor, "cpp_cache_precompile_headers", False)
    model, manifest = exported
    sample = synthetic_sample(16, 16, coils=2)
    deployed = E.deploy_auto(model, manifest, sample=sample, engines=["torch-compile"], rounds=1, loop_iterations=1)
    assert deployed.engine_choice == {"prior": "torch-compile"}
    x = model.prior_example_input("prior", 16, 16)
    with torch.no_grad():
        ref, out = model.prior(x), deployed.prior(x)
    assert E.max_relative_error(ref, out) <= E.TOLERANCE
