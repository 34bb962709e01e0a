"""Deployment back-ends: each prior replaced by a module that runs its exported engine.

The reconstructor loop is the training code itself (``model(y, physics)``); only the prior is
swapped, so the data-consistency operators and the iterate stay torch tensors on the run device.
On CUDA, engines read and write those tensors' device memory directly (onnxruntime I/O binding,
TensorRT tensor addresses on torch's current stream): no host copies.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import SpadeError
from .export import onnx_session, read_export_manifest
from .models import Reconstructor
from .paths import sha256_file

BACKENDS = ("torch", "onnxruntime", "tensorrt")


class OrtPrior(nn.Module):
    """A prior run by onnxruntime (CPU; CUDA provider with I/O binding when installed)."""

    def __init__(self, onnx_path: str | Path, device: str = "cpu", input_name: str = "x", output_name: str = "y"):
        super().__init__()
        self.device = torch.device(device)
        self.session = onnx_session(onnx_path, device)
        self.input_name, self.output_name = input_name, output_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        if x.device.type == "cpu":
            out = self.session.run([self.output_name], {self.input_name: x.numpy()})[0]
            return torch.from_numpy(out)
        binding = self.session.io_binding()
        y = torch.empty_like(x)  # priors map (B, C, H, W) to the same shape
        dev_id = x.device.index or 0
        binding.bind_input(self.input_name, "cuda", dev_id, np.float32, tuple(x.shape), x.data_ptr())
        binding.bind_output(self.output_name, "cuda", dev_id, np.float32, tuple(y.shape), y.data_ptr())
        torch.cuda.current_stream(x.device).synchronize()
        self.session.run_with_iobinding(binding)
        return y


class TrtPrior(nn.Module):
    """A prior run by a TensorRT engine on torch CUDA tensors (TensorRT 10 tensor API)."""

    def __init__(self, engine_path: str | Path, input_name: str = "x", output_name: str = "y"):
        super().__init__()
        try:
            import tensorrt as trt
        except ImportError:
            raise SpadeError("TensorRT is not installed: pip install 'spade-deploy[gpu]'") from None
        if not torch.cuda.is_available():
            raise SpadeError("the tensorrt back-end needs a CUDA GPU, and none is visible here")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise SpadeError(f"could not load TensorRT engine {engine_path}")
        self.context = self.engine.create_execution_context()
        self.input_name, self.output_name = input_name, output_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        y = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)), device=x.device, dtype=torch.float32)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise SpadeError("TensorRT execution failed")
        return y


def verify_export(model: Reconstructor, backend: str, manifest_path: str | Path,
                  checkpoint_sha256: str | None = None) -> dict:
    """The export manifest at ``manifest_path``, checked to belong to ``model`` before any engine is
    loaded: its structure (:func:`~spade_deploy.export.read_export_manifest`), the model name, one
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
           checkpoint_sha256: str | None = None) -> Reconstructor:
    """A copy of ``model`` whose priors run on ``backend`` (``torch`` returns the model itself).
    With ``checkpoint_sha256``, the export must come from that checkpoint file (:func:`verify_export`)."""
    if backend not in BACKENDS:
        raise SpadeError(f"unknown back-end {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if backend == "torch":
        return model.to(device)
    if manifest_path is None:
        raise SpadeError(f"the {backend} back-end needs an export manifest (spade export)")
    manifest = verify_export(model, backend, manifest_path, checkpoint_sha256)
    root = Path(manifest_path).parent
    deployed = copy.deepcopy(model).to(device).eval()
    for entry in manifest["priors"]:
        if backend == "onnxruntime":
            module = OrtPrior(root / entry["onnx"], device, manifest["input"], manifest["output"])
        else:
            module = TrtPrior(root / entry["engine"], manifest["input"], manifest["output"])
        deployed.set_prior(entry["name"], module)
    return deployed
