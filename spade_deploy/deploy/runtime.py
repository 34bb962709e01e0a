"""Deployment back-ends: each prior replaced by a module that runs its exported engine.

The reconstructor loop is the training code itself (``model(y, physics)``); only the prior is
swapped, so the data-consistency operators and the iterate stay torch tensors on the run device.
On CUDA, engines read and write those tensors' device memory directly (onnxruntime I/O binding,
TensorRT tensor addresses on torch's current stream): no host copies.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..device import on_model_device, placed, require_device
from ..errors import SpadeError
from .export import onnx_session, read_export_manifest, require_tensorrt
from ..models import Reconstructor
from ..paths import sha256_file

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")


class OrtPrior(nn.Module):
    """A prior run by onnxruntime: CPU, or the CUDA provider with I/O binding on torch's tensors.

    On CUDA the session runs on torch's current stream (``user_compute_stream``) and is told not
    to synchronise after each run, so a call queues work like a torch operator does; the I/O
    binding object is made once and rebound per call (pointers change, the binding does not).
    Every call returns a new output tensor: callers keep earlier outputs (the solver's history)."""

    def __init__(self, onnx_path: str | Path, device: str = "cpu", input_name: str = "x", output_name: str = "y"):
        super().__init__()
        self.device = require_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        self.session = onnx_session(onnx_path, str(self.device), cuda_stream=stream)
        self._stream = stream
        self.input_name, self.output_name = input_name, output_name
        self._binding = self.session.io_binding() if self.device.type == "cuda" else None
        # the output's channel count where the graph fixes it (USRNet's prior maps image + noise
        # map, 4 channels, to the 3-channel image); None: as many as the input
        channels = next((o.shape[1] for o in self.session.get_outputs() if o.name == output_name), None)
        self._out_channels = channels if isinstance(channels, int) else None
        self._run_options = None
        if self.device.type == "cuda":
            import onnxruntime as ort

            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        if self.device.type == "cpu":
            out = self.session.run([self.output_name], {self.input_name: x.detach().cpu().numpy()})[0]
            return torch.from_numpy(out).to(x.device)
        if x.device != self.device:
            raise SpadeError(f"onnxruntime session on {self.device} was given a tensor on {x.device}")
        # priors keep (B, H, W); the channels are the graph's
        y = torch.empty((x.shape[0], self._out_channels or x.shape[1], *x.shape[2:]), device=x.device, dtype=x.dtype)
        b, dev_id = self._binding, self.device.index
        b.bind_input(self.input_name, "cuda", dev_id, np.float32, tuple(x.shape), x.data_ptr())
        b.bind_output(self.output_name, "cuda", dev_id, np.float32, tuple(y.shape), y.data_ptr())
        if torch.cuda.current_stream(self.device).cuda_stream != self._stream:
            # another stream than the session's: order the two by a synchronisation
            torch.cuda.current_stream(self.device).synchronize()
            self.session.run_with_iobinding(b)
        else:
            self.session.run_with_iobinding(b, self._run_options)
        return y


class TrtPrior(nn.Module):
    """A prior run by a TensorRT engine on torch CUDA tensors (TensorRT 10 tensor API), on torch's
    current stream; shapes outside the engine's optimisation profile are a one-line error."""

    def __init__(self, engine_path: str | Path, input_name: str = "x", output_name: str = "y", device: str = "cuda"):
        super().__init__()
        trt = require_tensorrt()
        self.device = require_device(device)
        if self.device.type != "cuda":
            raise SpadeError("the tensorrt back-end runs on a CUDA GPU: use --device cuda")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(self.device):
            self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise SpadeError(f"could not load TensorRT engine {engine_path} (built by another TensorRT version or GPU?)")
            self.context = self.engine.create_execution_context()
        self.engine_path = Path(engine_path)
        self.input_name, self.output_name = input_name, output_name
        self._shape: tuple[int, ...] | None = None

    def profile_range(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        return tuple(lo), tuple(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        shape = tuple(x.shape)
        if shape != self._shape:  # shapes are set (and checked) once per new shape
            if not self.context.set_input_shape(self.input_name, shape):
                lo, hi = self.profile_range()
                raise SpadeError(f"input {shape} is outside the TensorRT engine's profile {lo} .. {hi} "
                                 f"({self.engine_path.name}); rebuild it with `spade export --trt --size` for this data")
            self._shape = shape
            self._out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        y = torch.empty(self._out_shape, device=x.device, dtype=torch.float32)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise SpadeError("TensorRT execution failed")
        return y


def low_precision(model: Reconstructor, dtype: torch.dtype) -> Reconstructor:
    """A copy of ``model`` whose priors compute in ``dtype`` (``torch.float16`` / ``torch.bfloat16``);
    the outer loop (data consistency, the solver's residual) stays FP32. Check it converges with
    :func:`check_precision` before use."""
    deployed = copy.deepcopy(model).eval()
    for name, prior in model.priors().items():
        deployed.set_prior(name, _CastPrior(copy.deepcopy(prior), dtype))
    return deployed


class _CastPrior(nn.Module):
    def __init__(self, prior: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.prior = prior.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prior(x.to(self.dtype)).float()


@dataclass
class PrecisionCheck:
    precision: str
    tol: float
    iterations: list[int]
    final_residual: list[float]
    converged: bool


@torch.no_grad()
def check_precision(model: Reconstructor, y: torch.Tensor, physics, precision: str,
                    tol: float | None = None, raise_on_failure: bool = True) -> PrecisionCheck:
    """Solve ``y`` with the priors in ``precision`` (fp32 | fp16 | bf16) and report the iterations
    and final fixed-point residual per slice. A precision whose residual does not reach the
    tolerance (the model's own, or ``tol`` when the user loosens it explicitly) is refused with a
    one-line error: a lower-precision prior can floor the residual above the tolerance, and the
    solver would then stop on its cap, never converged."""
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise SpadeError(f"unknown precision {precision!r} (fp32 | fp16 | bf16)")
    if not hasattr(model, "solver_cfg"):  # a fixed number of cascades: nothing to converge
        raise SpadeError(f"{model.registry_name} has no fixed-point solver: no residual to check")
    cfg = model.solver_cfg if tol is None else dataclasses.replace(model.solver_cfg, tol=tol)
    net = model if precision == "fp32" else low_precision(model, dtypes[precision])
    y, physics = on_model_device((y, physics), net)
    net.eval()(y, physics, solver=cfg)
    info = net.last_info
    result = PrecisionCheck(precision, cfg.tol, info.iterations.tolist(), info.residual.tolist(),
                            bool(info.converged.all()))
    if raise_on_failure and not result.converged:
        worst = max(result.final_residual)
        raise SpadeError(f"{precision} priors do not converge: residual {worst:.1e} after {max(result.iterations)} "
                         f"iterations, above tol {cfg.tol:g}; use fp32, or loosen the tolerance explicitly (--tol)")
    return result


def verify_export(model: Reconstructor, backend: str, manifest_path: str | Path,
                  checkpoint_sha256: str | None = None) -> dict:
    """The export manifest at ``manifest_path``, checked to belong to ``model`` before any engine is
    loaded: its structure (:func:`~spade_deploy.deploy.export.read_export_manifest`), the model name, one
    entry per prior of the model, the checkpoint it was exported from (``checkpoint_sha256``: the
    SHA-256 of the checkpoint file being deployed) and the hash of every file it would run."""
    from .export import member_path

    manifest = read_export_manifest(manifest_path)
    if manifest.get("model") != model.registry_name:
        raise SpadeError(f"{manifest_path} was exported from a {manifest.get('model')!r}, not a {model.registry_name!r}")
    names = [e["name"] for e in manifest["priors"]]
    if sorted(names) != sorted(model.priors()):
        raise SpadeError(f"{manifest_path} lists priors {', '.join(map(repr, names))}; the model has "
                         f"{', '.join(map(repr, model.priors()))}")
    if checkpoint_sha256 is not None and manifest.get("checkpoint_sha256") != checkpoint_sha256:
        raise SpadeError(f"{manifest_path} was exported from another checkpoint than the one deployed "
                         "(its checkpoint hash differs); export this checkpoint again")
    root = Path(manifest_path).parent
    file_key, hash_key = ("onnx", "sha256") if backend == "onnxruntime" else ("engine", "engine_sha256")
    for entry in manifest["priors"]:
        if backend == "tensorrt" and not entry.get("engine"):
            raise SpadeError(f"{manifest_path} has no TensorRT engine for {entry['name']!r}; run `spade export --trt`")
        path = member_path(root, entry[file_key], str(manifest_path))
        if not path.is_file():
            raise SpadeError(f"{manifest_path}: {path} is missing; export again")
        want = entry.get(hash_key)
        if want is None and checkpoint_sha256 is not None:
            raise SpadeError(f"{manifest_path} records no hash of {path.name}; export again")
        if want is not None and sha256_file(path) != want:
            raise SpadeError(f"{path} is not the file exported for prior {entry['name']!r} (its hash differs); export again")
    return manifest


def deploy(model: Reconstructor, backend: str, manifest_path: str | Path | None = None, device: str = "cpu",
           shape: tuple[int, int] | None = None, sample=None, checkpoint_sha256: str | None = None) -> Reconstructor:
    """A copy of ``model`` whose priors run on ``backend`` on ``device`` (``torch``: the model
    itself when it is already there, else a copy; the caller's model is never moved). With
    ``checkpoint_sha256``, the export must come from that checkpoint file (:func:`verify_export`).

    ``auto``: the engine the manifest records as fastest on this device for images of ``shape``
    (or those of ``sample = (y, physics)``), measured and recorded first where no such record
    exists (:func:`spade_deploy.deploy.engines.deploy_auto`)."""
    if backend not in BACKENDS:
        raise SpadeError(f"unknown back-end {backend!r}; choose one of: {', '.join(BACKENDS)}")
    dev = require_device(device)
    if backend == "tensorrt" and dev.type != "cuda":
        raise SpadeError("the tensorrt back-end runs on a CUDA GPU: use --device cuda")
    if backend == "auto":
        from .engines import deploy_auto

        if manifest_path is not None:  # the engines it may pick must belong to this model
            verify_export(model, "onnxruntime", manifest_path, checkpoint_sha256)
        return deploy_auto(model, manifest_path, device, shape=shape, sample=sample)
    if backend == "torch":
        return placed(model, dev)
    if manifest_path is None:
        raise SpadeError(f"the {backend} back-end needs an export manifest (spade export)")
    manifest = verify_export(model, backend, manifest_path, checkpoint_sha256)
    root = Path(manifest_path).parent
    deployed = copy.deepcopy(model).to(device).eval()
    for entry in manifest["priors"]:
        if backend == "onnxruntime":
            module = OrtPrior(root / entry["onnx"], device, manifest["input"], manifest["output"])
        else:
            module = TrtPrior(root / entry["engine"], manifest["input"], manifest["output"], device)
        deployed.set_prior(entry["name"], module)
    return deployed
