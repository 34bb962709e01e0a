"""Export: every prior matches PyTorch in onnxruntime, at every ratio; the runtime swaps priors."""

import json

import pytest
import torch

from spade_deploy.errors import SpadeError
from spade_deploy.deploy.export import build_trt_engines, export_onnx
from spade_deploy.deploy.priors import onnx_session
from spade_deploy.models import build_model
from spade_deploy.mri.physics import MultiCoilMRI
from spade_deploy.prune import prune_model
from spade_deploy.deploy.runtime import deploy


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.1, 0.2, 0.4])
def test_exported_priors_match_pytorch(ratio, tmp_path):
    torch.manual_seed(0)
    model = build_model("deq", preset="small")
    if ratio:
        model, _ = prune_model(model, ratio)
    res = export_onnx(model, tmp_path, f"r{ratio}")
    manifest = json.loads(res.manifest_path.read_text())
    assert manifest["opset"] >= 17 and manifest["model"] == "deq"
    for entry in manifest["priors"]:
        assert entry["max_rel_error"] <= 1e-4
        # dynamic batch / height / width
        sess = onnx_session(tmp_path / entry["onnx"])
        for shape in [(1, 2, 48, 40), (3, 2, 64, 64)]:
            x = torch.randn(shape)
            with torch.no_grad():
                ref = model.priors()[entry["name"]](x)
            out = torch.from_numpy(sess.run(["y"], {"x": x.numpy()})[0])
            assert out.shape == ref.shape
            assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_onnxruntime_backend_reconstructs_like_torch(tmp_path):
    torch.manual_seed(0)
    model, _ = prune_model(build_model("deq", preset="small"), 0.2)
    res = export_onnx(model, tmp_path, "m")
    deployed = deploy(model, "onnxruntime", res.manifest_path)
    g = torch.Generator().manual_seed(1)
    smaps = torch.randn(2, 4, 32, 32, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = torch.zeros(32)
    mask[::2] = 1
    physics = MultiCoilMRI(mask, smaps)
    y = physics.A(torch.randn(2, 32, 32, dtype=torch.complex64, generator=g))
    from spade_deploy.solvers import MIN_TOL, SolverConfig

    # The untrained operator is not contractive: a solve to its cap would amplify the priors' ~1e-7
    # differences without bound, so both run the same 10 Anderson iterations (a tolerance no
    # float32 iterate meets).
    ten = SolverConfig(max_iter=10, tol=MIN_TOL)
    with torch.no_grad():
        ref = model.eval()(y, physics, solver=ten)
        out = deployed(y, physics, solver=ten)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert deployed.solve_info().iterations.tolist() == model.solve_info().iterations.tolist() == [10, 10]
    assert isinstance(model.prior, torch.nn.Module) and type(model.prior).__name__ == "EDSR"  # original untouched


def _tensorrt_usable() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(_tensorrt_usable(), reason="TensorRT and a GPU are present here: nothing to refuse")
def test_tensorrt_without_tensorrt_is_a_clear_error(tmp_path):
    model = build_model("deq", preset="tiny")
    res = export_onnx(model, tmp_path, "m")
    with pytest.raises(SpadeError, match="TensorRT"):
        build_trt_engines(res.manifest_path, model, (32, 32))
    with pytest.raises(SpadeError, match="TensorRT|tensorrt"):
        deploy(build_model("deq", preset="tiny"), "tensorrt", res.manifest_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_reconstruction_matches_cpu():
    torch.manual_seed(0)
    model = build_model("deq", preset="small").eval()
    g = torch.Generator().manual_seed(1)
    smaps = torch.randn(1, 4, 32, 32, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    physics = MultiCoilMRI(torch.ones(32), smaps)
    y = physics.A(torch.randn(1, 32, 32, dtype=torch.complex64, generator=g))
    with torch.no_grad():
        ref = model(y, physics)
        out = model.cuda()(y.cuda(), physics.cuda()).cpu()
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
