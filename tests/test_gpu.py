"""The CUDA path itself: no host synchronisation inside a DEQ iteration or a VarNet cascade, bench /
evaluate on a CUDA model without moving the caller's model, onnxruntime's CUDA provider active,
TensorRT engines checked against PyTorch (where installed), TF32 off.

Each test runs on its own, in any order. The CUDA-only checks skip without a GPU; the bodies that
also run on a CPU (the bench on a device) run there when ``SPADE_GPU_CPU_DRY_RUN=1``
(``benchmarks/gpu.sh --cpu-dry-run``, which the device emulation runs), so the device run's test
code has been executed before a GPU is ever used."""

import importlib.util
import json
import os

import pytest
import torch

from spade_deploy import solvers
from spade_deploy.device import model_device, require_device
from spade_deploy.errors import SpadeError
from spade_deploy.models import build_model
from spade_deploy.mri.physics import MultiCoilMRI
from spade_deploy.solvers import SolverConfig

HAS_CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get("SPADE_GPU_CPU_DRY_RUN") == "1"
pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(autouse=True)
def _tf32_restored():
    """Each test sets the TF32 switches it relies on (require_device) and leaves them as found."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture()
def dev() -> str:
    """``cuda``; on a machine without one ``cpu`` in the GPU run's CPU dry run, else skipped."""
    if HAS_CUDA:
        require_device("cuda")  # TF32 off, as every spade command on CUDA
        return "cuda"
    if DRY_RUN:
        return "cpu"
    pytest.skip("needs a CUDA GPU (benchmarks/gpu.sh --cpu-dry-run runs this body on the CPU)")


def _problem(n=2, size=64, coils=4, device="cuda"):
    g = torch.Generator().manual_seed(1)
    smaps = torch.randn(n, coils, size, size, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = torch.zeros(size)
    mask[::3] = 1
    mask[size // 2 - 4 : size // 2 + 4] = 1
    physics = MultiCoilMRI(mask, smaps)
    y = physics.A(torch.randn(n, size, size, dtype=torch.complex64, generator=g))
    return y.to(device), physics.to(device)


def _syncs_outside_stop_checks(monkeypatch, run):
    """Run ``run()`` with CUDA sync debugging set to raise everywhere but inside the solver's stopping
    checks; returns the number of those checks (each one a synchronisation)."""
    checks = {"n": 0}
    orig = solvers._host_all

    def allowed(flags):
        checks["n"] += 1
        torch.cuda.set_sync_debug_mode(0)
        try:
            return orig(flags)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(solvers, "_host_all", allowed)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return checks["n"]


@needs_cuda
@pytest.mark.parametrize("method", ["anderson", "fixed-point"])
def test_deq_iteration_holds_no_host_synchronisation(monkeypatch, method):
    require_device("cuda")
    model = build_model("deq", preset="small").cuda().eval()
    y, physics = _problem()
    cfg = SolverConfig(method=method, max_iter=40, tol=1e-4, check_every=8)
    with torch.no_grad():
        model(y, physics, solver=cfg)  # warm-up: cuDNN / cuFFT plans
        n = _syncs_outside_stop_checks(monkeypatch, lambda: model(y, physics, solver=cfg))
    ran = int(model.solve_info().iterations.max())
    assert model.solve_info().resident and n == model.solve_info().host_checks <= ran // 8 + 1
    print(f"\nDEQ {method}: {ran} iterations, {n} host synchronisations (0 per iteration)")


@needs_cuda
def test_varnet_cascades_hold_no_host_synchronisation(monkeypatch):
    require_device("cuda")
    for name in ("varnet", "e2e-varnet"):
        model = build_model(name, preset="small").cuda().eval()
        y, physics = _problem()
        with torch.no_grad():
            model(y, physics)
            assert _syncs_outside_stop_checks(monkeypatch, lambda: model(y, physics)) == 0


@needs_cuda
def test_cuda_matches_cpu_with_the_resident_loop():
    require_device("cuda")  # TF32 off: the 1e-3 agreement below is FP32's
    torch.manual_seed(0)
    model = build_model("deq", preset="small").eval()
    y, physics = _problem(device="cpu")
    with torch.no_grad():
        ref = model(y, physics)
        ref_iters = model.solve_info().iterations.tolist()
        gpu = build_model("deq", preset="small").eval()
        gpu.load_state_dict(model.state_dict())
        gpu = gpu.cuda()
        out = gpu(y.cuda(), physics.to("cuda")).cpu()
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert max(abs(a - b) for a, b in zip(gpu.solve_info().iterations.tolist(), ref_iters)) <= 1


def test_bench_and_evaluate_on_cuda_leave_the_callers_model_in_place(make_fastmri_file, tmp_path, dev):
    """The GPU bench's own calls: run_bench deploys each variant as ``backends[name](variant, sample)``
    on the device, scores it there as on the CPU, and the caller's model stays where it was."""
    from spade_deploy import bench as B
    from spade_deploy.mri.reader import SliceDataset
    from spade_deploy.deploy.runtime import deploy
    from spade_deploy.mri.task import MRITask
    from spade_deploy.train import evaluate

    # h5py only (no dataset builder); the file's own coil maps: ESPIRiT (sigpy) is not on the device,
    # and 20 columns hold too few ACS lines for it. The shape is the fixture header's matrix size.
    make_fastmri_file("a.h5", slices=3, shape=(16, 20), folder=tmp_path / "test")
    model = build_model("deq", preset="tiny").eval()
    model.solver_cfg = SolverConfig(max_iter=10, tol=1e-3)
    test = SliceDataset(tmp_path / "test", coil_maps="file")
    task = MRITask(6, 0.08, coil_maps="file")
    calls = []

    def on_device(v, sample):
        calls.append((tuple(sample[0].shape), sample[0].device.type))
        return deploy(v.model, "torch", device=dev)

    res = B.run_bench([B.Variant("deq", 0.0, None, model)], {"torch": on_device}, test, task, repeats=2, device=dev)
    assert calls == [((1, 4, 16, 20), dev)]  # one deployment, given the first slice on the device
    assert model_device(model).type == "cpu"
    row = res.rows[0]
    assert res.device == B.describe_device(torch.device(dev)) and row.backend == "torch"
    assert row.latency_ms > 0 and torch.isfinite(torch.tensor(row.psnr))
    on_dev = build_model("deq", preset="tiny").eval()
    on_dev.load_state_dict(model.state_dict())
    on_dev.solver_cfg = model.solver_cfg
    on_dev = on_dev.to(dev)
    out = B.plot_examples([B.Variant("deq", 0.0, None, on_dev)], test, task, tmp_path / "ex.png")
    assert out.is_file() and out.stat().st_size > 0
    dev_res = evaluate(on_dev, test, task)
    cpu_res = evaluate(model, test, task)
    assert model_device(on_dev).type == dev
    # the same reconstructions: the bench's first round scored them, and the CPU agrees within FP32 round-off
    assert abs(dev_res.psnr - cpu_res.psnr) < 0.05
    assert abs(row.psnr - dev_res.psnr) < 0.05


@needs_cuda
def test_onnxruntime_cuda_provider_is_active_and_matches_torch(tmp_path):
    require_device("cuda")
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(SpadeError, match="onnxruntime-gpu"):
            from spade_deploy.deploy.priors import onnx_session

            onnx_session(tmp_path / "none.onnx", "cuda")
        pytest.skip("CPU onnxruntime here: the refusal is what there is to check")
    from spade_deploy.deploy.export import export_onnx
    from spade_deploy.deploy.priors import OrtPrior

    model = build_model("deq", preset="small").eval()
    res = export_onnx(model, tmp_path, "m")
    prior = OrtPrior(tmp_path / res.priors[0].onnx, "cuda")
    assert prior.session.get_providers()[0] == "CUDAExecutionProvider"
    x = torch.randn(2, 2, 64, 64, device="cuda")
    with torch.no_grad():
        ref = model.prior.cuda()(x)
    outs = [prior(x), prior(x + 1)]  # two calls: the second must not overwrite the first
    assert (outs[0] - ref).abs().max() <= 1e-3 * ref.abs().max()
    assert not torch.equal(outs[0], outs[1])


@needs_cuda
@pytest.mark.skipif(not HAS_TRT, reason="TensorRT not installed")
def test_tensorrt_engines_are_checked_and_recorded(tmp_path):
    from spade_deploy.deploy.export import build_trt_engines, export_onnx
    from spade_deploy.deploy.priors import TrtPrior

    model = build_model("deq", preset="small").eval()
    res = export_onnx(model, tmp_path, "m")
    man = build_trt_engines(res.manifest_path, model, (64, 48), max_batch=2)
    assert man["precision"] == "fp32" and man["tensorrt"].startswith("10.") and man["gpu"] == torch.cuda.get_device_name()
    entry = man["priors"][0]
    assert entry["engine_max_rel_error"] <= 1e-3 and entry["engine_profile"]["max"] == [2, 2, 64, 48]
    assert json.loads(res.manifest_path.read_text())["priors"][0]["engine"] == entry["engine"]
    prior = TrtPrior(tmp_path / entry["engine"], device="cuda")
    with pytest.raises(SpadeError, match=r"outside the TensorRT engine's profile \(1, 2, 64, 48\) \.\. \(2, 2, 64, 48\)"):
        prior(torch.randn(1, 2, 80, 48, device="cuda"))
    man16 = build_trt_engines(res.manifest_path, model, (64, 48), fp16=True, max_batch=2)
    assert man16["precision"] == "fp16" and man16["priors"][0]["engine_precision"] == "fp16"


@needs_cuda
def test_tf32_is_off_on_cuda():
    torch.backends.cudnn.allow_tf32 = True
    require_device("cuda")
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
