"""The GPU path's CPU-checkable parts: batches go to the model's device, the caller's model is never
moved, the device-resident solver loop gives the sub-batch loop's iterates with the stopping check
off the per-iteration path, a lower-precision prior is refused where it cannot converge, and every
GPU-only request on a machine without a GPU (or without TensorRT / onnxruntime-gpu) is one line."""

import importlib.util
import math
import sys

import pytest
import torch
from typer.testing import CliRunner

from spade_deploy.checkpoint import save_model
from spade_deploy.device import model_device, on_model_device, placed, to_device
from spade_deploy.errors import SpadeError
from spade_deploy.tasks import Batch
from spade_deploy.models import build_model
from spade_deploy.mri.physics import MultiCoilMRI
from spade_deploy.deploy.runtime import check_precision, deploy
from spade_deploy.solvers import SolverConfig, solve

from cli.main import app

runner = CliRunner()
HAS_CUDA = torch.cuda.is_available()
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def _operator(n: int = 5, d: int = 48, seed: int = 0):
    """A per-sample affine contraction ``T(x)_b = A_b x_b + c_b`` with rates 0.3 .. 0.95, computed
    sample by sample so the sub-batch and whole-batch calls give the same numbers bit for bit."""
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.3, 0.95, n)
    A = torch.randn(n, d, d, generator=g, dtype=torch.float64)
    A = A / torch.linalg.matrix_norm(A, 2)[:, None, None] * rates[:, None, None]
    c = torch.randn(n, d, generator=g, dtype=torch.float64)
    calls = []

    def T(x, idx=None):
        rows = range(n) if idx is None else idx.tolist()
        calls.append(len(rows))
        xf = x.reshape(x.shape[0], -1)
        return torch.stack([A[i] @ xf[j] + c[i] for j, i in enumerate(rows)]).reshape(x.shape)

    x0 = torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64)
    return T, x0, calls


@pytest.mark.parametrize("method", ["anderson", "fixed-point"])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_resident_loop_gives_the_sub_batch_iterates_and_counts(method, k):
    T, x0, _ = _operator()
    cfg = SolverConfig(method=method, max_iter=200, tol=1e-6)
    ref, ref_info = solve(T, x0, cfg)
    assert not ref_info.resident and len(set(ref_info.iterations.tolist())) > 2  # samples stop at different iterations
    out, info = solve(T, x0, SolverConfig(method=method, max_iter=200, tol=1e-6, resident=True, check_every=k))
    assert info.resident
    assert info.iterations.tolist() == ref_info.iterations.tolist()
    assert torch.equal(out, ref)  # each sample frozen at exactly the iterate it stopped on
    assert torch.equal(info.residual, ref_info.residual) and bool(info.converged.all())


def test_resident_loop_hits_the_cap_like_the_sub_batch_loop():
    T, x0, _ = _operator()
    ref, ref_info = solve(T, x0, SolverConfig(method="fixed-point", max_iter=20, tol=1e-6))
    out, info = solve(T, x0, SolverConfig(method="fixed-point", max_iter=20, tol=1e-6, resident=True, check_every=6))
    assert info.iterations.tolist() == ref_info.iterations.tolist() and max(info.iterations.tolist()) == 20
    assert info.converged.tolist() == ref_info.converged.tolist() and not bool(info.converged.all())
    assert torch.equal(out, ref)


_SYNCING = ("__bool__", "item", "tolist", "nonzero", "__int__", "__float__", "__index__", "numpy", "cpu")


def _count_host_reads(monkeypatch):
    """Count every tensor method that reads device values back to the host."""
    counts = {"n": 0}
    for name in _SYNCING:
        orig = getattr(torch.Tensor, name)

        def counted(self, *a, _orig=orig, **kw):
            counts["n"] += 1
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(torch.linalg, "solve", lambda *a, **kw: pytest.fail("torch.linalg.solve checks errors on the host"))
    return counts


@pytest.mark.parametrize("k", [1, 4, 8])
def test_resident_loop_reads_the_stop_only_every_k_iterations(monkeypatch, k):
    T, x0, _ = _operator()
    x0 = x0.float()

    def T_whole(x, idx=None):  # the operator without its own host reads (a DEQ's on the whole batch)
        assert idx is None, "the resident loop computes the whole batch"
        return (0.8 * x + 0.1).reshape(x.shape) * torch.linspace(0.5, 1.0, x.shape[0]).view(-1, 1, 1, 1)

    counts = _count_host_reads(monkeypatch)
    _, info = solve(T_whole, x0, SolverConfig(max_iter=100, tol=1e-5, resident=True, check_every=k))
    reads, ran = counts["n"], int(info.iterations.max())
    monkeypatch.undo()
    assert bool(info.converged.all())
    # every host read is a stopping check, and there are at most ceil(iterations / k) + 1 of them
    assert reads == info.host_checks <= math.ceil(ran / k) + 1
    if k > 1:
        assert reads < ran


def test_sync_free_small_solve_matches_lapack():
    """The Anderson solve used on CUDA (elementwise elimination) against LAPACK on regularised Gram
    matrices like the solver's."""
    from spade_deploy.solvers import spd_solve

    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 5):
        G = torch.randn(6, n, 400, generator=g, dtype=torch.float64)
        gram = G @ G.transpose(1, 2)
        gram = gram + 1e-4 * gram.diagonal(dim1=1, dim2=2).mean(1)[:, None, None] * torch.eye(n, dtype=torch.float64)
        ones = torch.ones(6, n, 1, dtype=torch.float64)
        ref = torch.linalg.solve(gram, ones)
        before = gram.clone()
        assert torch.allclose(spd_solve(gram, ones), ref, rtol=1e-8, atol=0)
        assert torch.equal(gram, before)  # the input is not overwritten
        got32 = spd_solve(gram.float(), ones.float())
        assert torch.allclose(got32.double(), ref, rtol=1e-2, atol=0)


def test_sub_batch_loop_checks_every_iteration():
    """The CPU default keeps its per-iteration decisions (and computes only the active samples)."""
    T, x0, calls = _operator()
    _, info = solve(T, x0, SolverConfig(max_iter=200, tol=1e-6))
    ran = int(info.iterations.max())
    assert info.host_checks >= ran and sum(calls) == int(info.iterations.sum())


def test_deq_resident_and_sub_batch_agree():
    torch.manual_seed(0)
    model = build_model("deq", preset="tiny").eval()
    g = torch.Generator().manual_seed(1)
    smaps = torch.randn(3, 4, 24, 24, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = (torch.rand(24, generator=g) < 0.5).float()
    mask[10:14] = 1
    physics = MultiCoilMRI(mask, smaps)
    y = physics.A(torch.randn(3, 24, 24, dtype=torch.complex64, generator=g))
    y[1] *= 3  # samples stop at different iterations
    # At tol 3e-4 every sample's residual is at least 11 % from the tolerance at its stop and the
    # iteration before (at 1e-4 one was 2.9 % under it), so equal counts do not hang on round-off.
    with torch.no_grad():
        ref = model(y, physics, solver=SolverConfig(max_iter=100, tol=3e-4, resident=False))
        ref_info = model.solve_info()
        out = model(y, physics, solver=SolverConfig(max_iter=100, tol=3e-4, resident=True, check_every=5))
    info = model.solve_info()
    assert info.resident and not ref_info.resident and bool(ref_info.converged.all())
    assert info.iterations.tolist() == ref_info.iterations.tolist() and len(set(ref_info.iterations.tolist())) > 1
    torch.testing.assert_close(info.residual, ref_info.residual, rtol=1e-3, atol=0)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


# -- device placement --------------------------------------------------------------------------
def _batch(n=2, h=16, w=16):
    g = torch.Generator().manual_seed(0)
    smaps = torch.randn(n, 4, h, w, dtype=torch.complex64, generator=g)
    physics = MultiCoilMRI(torch.ones(w), smaps)
    y = torch.randn(n, 4, h, w, dtype=torch.complex64, generator=g)
    return Batch(y=y, physics=physics, x_gt=None, target=torch.rand(n, h, w), keys=[("a", 0), ("a", 1)],
                 meta={"maxval": torch.ones(n), "fnames": ["a"] * n, "slices": [0, 1]})


def test_a_batch_goes_to_the_device_of_its_model():
    model = build_model("deq", preset="tiny").to("meta")  # a device other than the CPU, without a GPU
    batch = on_model_device(_batch(), model)
    assert model_device(model).type == "meta"
    assert batch.y.device.type == "meta" and batch.target.device.type == "meta"
    assert batch.physics.smaps.device.type == "meta" and batch.x_gt is None and batch.meta["fnames"] == ["a", "a"]
    assert batch.meta["maxval"].device.type == "meta"
    y, physics = to_device((torch.ones(2), MultiCoilMRI(torch.ones(4), torch.ones(1, 1, 2, 4, dtype=torch.complex64))), "meta")
    assert y.device.type == "meta" and physics.mask.device.type == "meta"


def test_the_callers_model_is_never_moved():
    model = build_model("deq", preset="tiny")
    assert deploy(model, "torch", device="cpu") is model  # already there: no copy
    copy = placed(model, "meta")
    assert copy is not model and model_device(copy).type == "meta"
    assert model_device(model).type == "cpu" and all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("where", ["evaluate", "fit", "reconstruct", "bench"])
def test_every_batch_meets_its_model_through_the_placement(monkeypatch, where, tiny_dataset, tmp_path):
    """evaluate, the trainer, reconstruct and bench move each batch to the model's device."""
    import spade_deploy.bench as B
    import spade_deploy.mri.reconstruct as R
    import spade_deploy.mri.task as MRI
    from spade_deploy.mri.task import MRITask
    import spade_deploy.train as TR
    from spade_deploy.mri.deq import DEQTrainOptions
    from spade_deploy.mri.reader import SliceDataset
    from spade_deploy.losses import SupervisedLoss

    seen = []

    def record(obj, model):
        seen.append(model)
        return on_model_device(obj, model)

    monkeypatch.setattr(TR, "on_model_device", record)
    monkeypatch.setattr(MRI, "on_model_device", record)
    monkeypatch.setattr(R, "on_model_device", record)
    monkeypatch.setattr(B, "on_model_device", record)
    model = build_model("deq", preset="tiny")
    model.solver_cfg = SolverConfig(max_iter=3, tol=1e-4)
    root = tiny_dataset.root
    test = SliceDataset(root / "test")
    if where == "evaluate":
        TR.evaluate(model, test, batch_size=2)
    elif where == "fit":
        TR.fit(model, SupervisedLoss(), SliceDataset(root / "train"),
               None, TR.TrainConfig(epochs=1, max_steps_per_epoch=1, batch_size=2,
                                    model_options=DEQTrainOptions(train_max_iter=2, lipschitz_weight=0)),
               tmp_path / "run")
    elif where == "reconstruct":
        R.reconstruct_files(model, root / "test", tmp_path / "rec", 6, 0.08, batch_size=2)
    else:
        B.plot_examples([B.Variant("deq", 0.0, None, model)], test, MRITask(6, 0.08), tmp_path / "ex.png")
    assert seen and all(m is model for m in seen)


# -- precision ---------------------------------------------------------------------------------
def _deq_problem():
    from importlib.resources import files

    from spade_deploy.checkpoint import load_model

    model, _ = load_model(files("spade_deploy") / "weights" / "deq-small.safetensors")  # the shipped small DEQ
    g = torch.Generator().manual_seed(3)
    n = 48
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, n), torch.linspace(-1, 1, n), indexing="ij")
    img = ((xx**2 / 0.6 + yy**2 / 0.8) < 0.7).float() * (1 + 0.3 * torch.sin(6 * xx)) + 0j
    smaps = torch.randn(1, 4, n, n, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = torch.zeros(n)
    mask[::3] = 1
    mask[20:28] = 1
    physics = MultiCoilMRI(mask, smaps)
    return model.eval(), physics.A(img[None].to(torch.complex64)), physics


def test_a_precision_that_cannot_converge_is_refused_unless_the_tolerance_is_loosened():
    model, y, physics = _deq_problem()
    fp32 = check_precision(model, y, physics, "fp32")
    assert fp32.converged and fp32.final_residual[0] < model.solver_cfg.tol
    with pytest.raises(SpadeError, match=r"bf16 priors do not converge: residual .* above tol 0.0001.*loosen"):
        check_precision(model, y, physics, "bf16")  # bf16 arithmetic emulated by CPU torch
    report = check_precision(model, y, physics, "bf16", raise_on_failure=False)
    assert not report.converged and report.final_residual[0] > model.solver_cfg.tol
    loose = check_precision(model, y, physics, "bf16", tol=10 * report.final_residual[0])
    assert loose.converged and loose.iterations[0] < model.solver_cfg.max_iter


# -- one-line refusals -------------------------------------------------------------------------
def _fails_cleanly(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    out = result.stderr.strip()
    assert out.startswith("error:") and len(out.splitlines()) == 1, out
    assert match in out, out


@pytest.fixture()
def checkpoint(tmp_path):
    path = tmp_path / "deq.safetensors"
    save_model(path, build_model("deq", preset="tiny"))
    return path


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible here")
def test_cuda_requests_without_a_gpu_are_one_line(tmp_path, checkpoint, tiny_dataset):
    data = str(tiny_dataset.root)
    _fails_cleanly(["bench", str(checkpoint), "--device", "cuda", "--data", data, "-o", str(tmp_path / "o")], "no CUDA GPU")
    _fails_cleanly(["bench", str(checkpoint), "-b", "tensorrt", "--device", "cuda", "--data", data, "-o", str(tmp_path / "o")], "no CUDA GPU")
    _fails_cleanly(["export", str(checkpoint), "--trt", "--size", "16x16", "-o", str(tmp_path / "e")], "TensorRT needs a CUDA GPU")
    with pytest.raises(SpadeError, match="no CUDA GPU"):
        deploy(build_model("deq", preset="tiny"), "onnxruntime", tmp_path / "x.json", device="cuda")
    with pytest.raises(SpadeError, match="CUDA GPU"):
        deploy(build_model("deq", preset="tiny"), "tensorrt", tmp_path / "x.json", device="cuda")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_gpu_only_options_without_their_gpu_setting_are_one_line(tmp_path, checkpoint, tiny_dataset):
    data = str(tiny_dataset.root)
    _fails_cleanly(["bench", str(checkpoint), "-b", "tensorrt", "--data", data, "-o", str(tmp_path / "o")], "add --device cuda")
    _fails_cleanly(["bench", str(checkpoint), "--device", "tpu", "--data", data, "-o", str(tmp_path / "o")], "device")
    _fails_cleanly(["export", str(checkpoint), "--fp16", "-o", str(tmp_path / "e")], "add --trt")
    _fails_cleanly(["export", str(checkpoint), "--size", "16x16", "-o", str(tmp_path / "e")], "add --trt")
    with pytest.raises(SpadeError, match="use --device cuda"):
        deploy(build_model("deq", preset="tiny"), "tensorrt", tmp_path / "x.json", device="cpu")
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


@pytest.mark.skipif(HAS_CUDA and HAS_TRT, reason="TensorRT and a GPU are present here")
def test_export_trt_without_tensorrt_is_one_line(tmp_path, checkpoint):
    _fails_cleanly(["export", str(checkpoint), "--trt", "--size", "16x16", "-o", str(tmp_path / "e")], "TensorRT")
    assert not (tmp_path / "e").exists()


def test_missing_onnxruntime_names_the_package_to_install(monkeypatch, tmp_path):
    from spade_deploy.deploy.priors import onnx_session

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(SpadeError, match=r"onnxruntime is not installed: pip install 'spade-deploy\[cpu\]'.*\[gpu\]"):
        onnx_session(tmp_path / "m.onnx")


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is visible here")
def test_cpu_onnxruntime_asked_for_cuda_is_one_line(tmp_path):
    """The CPU build of onnxruntime has no CUDA provider: said, not fallen back from in silence."""
    import onnxruntime as ort

    from spade_deploy.deploy.export import export_onnx
    from spade_deploy.deploy.priors import onnx_session

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu installed")
    res = export_onnx(build_model("deq", preset="tiny"), tmp_path, "m")
    with pytest.raises(SpadeError, match="CPU build.*onnxruntime-gpu"):
        onnx_session(res.manifest_path.parent / res.priors[0].onnx, "cuda")


def test_engine_profile_is_the_datas_shape_and_channels():
    from spade_deploy.deploy.export import trt_profile

    deq, varnet = build_model("deq", preset="tiny"), build_model("varnet", preset="small")
    assert trt_profile(deq, "prior", (160, 160), 4) == {"min": [1, 2, 160, 160], "opt": [1, 2, 160, 160], "max": [4, 2, 160, 160]}
    # VarNet's U-Net sees the slice padded to multiples of 16
    assert trt_profile(varnet, "cascade0", (150, 100), 2)["max"] == [2, 2, 160, 112]
    with pytest.raises(SpadeError):
        trt_profile(deq, "prior", (16, 16), 0)
