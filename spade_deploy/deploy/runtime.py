"""Deployment back-ends: each prior replaced by a module that runs its exported engine.

The reconstructor loop is the training code itself (``model(y, physics)``); only the prior is
swapped, so the data-consistency operators and the iterate stay torch tensors on the run device.
On CUDA, engines read and write those tensors' device memory directly (onnxruntime I/O binding,
TensorRT tensor addresses on torch's current stream): no host copies.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..device import on_model_device, placed, require_device
from ..errors import SpadeError
from ..models import Reconstructor
from ..paths import sha256_file
from .engines import apply_precision, backend_names, deploy_auto, engine_label
from .export import member_path, read_export_manifest
from .widths import deploy_widths
from .priors import DTYPES, CastPrior, OrtPrior, TrtPrior

BACKENDS = backend_names()  # auto, and the engines registered as back-ends (spade_deploy.deploy.engines)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# The precision a deployment runs when its caller names none (the CLI's --precision sets it).
ENV_PRECISION = "SPADE_PRECISION"

_PRECISION: contextvars.ContextVar[str | None] = contextvars.ContextVar("spade_default_precision", default=None)


@contextlib.contextmanager
def default_precision(precision: str):
    """Deployments inside that name no precision run ``precision`` (a command's ``--precision``)."""
    if precision not in PRECISIONS:
        raise SpadeError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


# Unrolled models in low precision: the largest quality loss on the validation split accepted.
MAX_PSNR_LOSS_DB = 0.05
MAX_SSIM_LOSS = 0.001


def low_precision(model: Reconstructor, dtype: torch.dtype) -> Reconstructor:
    """A copy of ``model`` whose priors compute in ``dtype`` (``torch.float16`` / ``torch.bfloat16``);
    the outer loop (data consistency, the solver's residual) stays FP32. Check it converges with
    :func:`check_precision` before use."""
    deployed = copy.deepcopy(model).eval()
    name_of = {v: k for k, v in DTYPES.items()}
    for name, prior in model.priors().items():
        deployed.set_prior(name, CastPrior(prior, name_of[dtype]))
    return deployed


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
    if precision not in DTYPES:
        raise SpadeError(f"unknown precision {precision!r} (fp32 | fp16 | bf16)")
    if model.solver_cfg is None:  # a fixed number of cascades: nothing to converge
        raise SpadeError(f"{model.registry_name} has no fixed-point solver: no residual to check")
    cfg = model.solver_cfg if tol is None else dataclasses.replace(model.solver_cfg, tol=tol)
    net = model if precision == "fp32" else low_precision(model, DTYPES[precision])
    y, physics = on_model_device((y, physics), net)
    net.eval()(y, physics, solver=cfg)
    info = net.solve_info()
    result = PrecisionCheck(precision, cfg.tol, info.iterations.tolist(), info.residual.tolist(),
                            bool(info.converged.all()))
    if raise_on_failure and not result.converged:
        worst = max(result.final_residual)
        raise SpadeError(f"{precision} priors do not converge: residual {worst:.1e} after {max(result.iterations)} "
                         f"iterations, above tol {cfg.tol:g}; use fp32, or loosen the tolerance explicitly (--tol)")
    return result


@dataclass
class UnrolledPrecision:
    """The quality check of an unrolled model in low precision on a validation split."""

    precision: str
    accepted: bool
    psnr_fp32: float
    ssim_fp32: float
    psnr_low: float
    ssim_low: float
    reason: str
    n_slices: int

    @property
    def psnr_change(self) -> float:
        return self.psnr_low - self.psnr_fp32

    @property
    def ssim_change(self) -> float:
        return self.ssim_low - self.ssim_fp32


@torch.no_grad()
def check_unrolled_precision(model: Reconstructor, task, dataset, precision: str = "bf16",
                             max_psnr_loss: float = MAX_PSNR_LOSS_DB, max_ssim_loss: float = MAX_SSIM_LOSS,
                             low_model: Reconstructor | None = None) -> UnrolledPrecision:
    """Score ``model`` (an unrolled reconstructor) on ``dataset`` (its validation split) with the
    task's evaluation in FP32 and with its priors in ``precision``: accepted only where PSNR falls
    by at most ``max_psnr_loss`` dB and SSIM by at most ``max_ssim_loss``; else refused, the reason
    saying which bound it broke. ``low_model``: the low-precision model to score (default
    :func:`low_precision` of ``model``)."""
    if precision not in DTYPES or precision == "fp32":
        raise SpadeError(f"unknown low precision {precision!r} (fp16 | bf16)")
    if model.solver_cfg is not None:
        raise SpadeError(f"{model.registry_name} is a fixed-point model: use its precision schedule (deploy)")
    ref = task.evaluate(model.eval(), dataset, batch_size=1)
    low = task.evaluate((low_model or low_precision(model, DTYPES[precision])).eval(), dataset, batch_size=1)
    dpsnr, dssim = low.psnr - ref.psnr, low.ssim - ref.ssim
    broken = []
    if not dpsnr >= -max_psnr_loss:  # NaN included
        broken.append(f"PSNR {dpsnr:+.3f} dB (bound -{max_psnr_loss:g})")
    if not dssim >= -max_ssim_loss:
        broken.append(f"SSIM {dssim:+.4f} (bound -{max_ssim_loss:g})")
    reason = (f"{precision} refused: " + ", ".join(broken) if broken else
              f"{precision} accepted: PSNR {dpsnr:+.3f} dB, SSIM {dssim:+.4f} within -{max_psnr_loss:g} dB / -{max_ssim_loss:g}")
    n = getattr(ref, "n_slices", len(dataset))
    return UnrolledPrecision(precision, not broken, ref.psnr, ref.ssim, low.psnr, low.ssim, reason + f" on {n} slices", n)


def verify_export(model: Reconstructor, backend: str, manifest_path: str | Path,
                  checkpoint_sha256: str | None = None) -> dict:
    """The export manifest at ``manifest_path``, checked to belong to ``model`` before any engine is
    loaded: its structure (:func:`~spade_deploy.deploy.export.read_export_manifest`), the model name, one
    entry per prior of the model, the checkpoint it was exported from (``checkpoint_sha256``: the
    SHA-256 of the checkpoint file being deployed) and the hash of every file it would run."""
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
           shape: tuple[int, int] | None = None, sample=None, checkpoint_sha256: str | None = None,
           precision: str | None = None, validation=None) -> Reconstructor:
    """A copy of ``model`` whose priors run on ``backend`` on ``device`` (``torch``: the model
    itself when it is already there, else a copy; the caller's model is never moved). With
    ``checkpoint_sha256``, the export must come from that checkpoint file (:func:`verify_export`).

    ``auto``: the engine the manifest records as fastest on this device for images of ``shape``
    (or those of ``sample = (y, physics)``), measured and recorded first where no such record
    exists (:func:`spade_deploy.deploy.engines.deploy_auto`).

    ``precision`` (default: that of :func:`default_precision`, else ``$SPADE_PRECISION``, else ``auto``): ``auto`` is the measured choice of
    the ``auto`` back-end (FP32 on the others), ``fp32`` never anything else, ``bf16`` / ``fp16`` a
    precision schedule for a fixed-point model whatever its speed (refused for an unrolled one:
    :func:`check_unrolled_precision` on ``validation = (task, dataset)``, its validation split,
    decides; refused without one). The deployed model says what runs: ``engine_label`` (e.g.
    ``channels-last bf16->fp32``) and ``precision``."""
    if backend not in BACKENDS:
        raise SpadeError(f"unknown back-end {backend!r}; choose one of: {', '.join(BACKENDS)}")
    precision = precision or _PRECISION.get() or os.environ.get(ENV_PRECISION) or "auto"
    if precision not in PRECISIONS:
        raise SpadeError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision not in ("auto", "fp32") and model.solver_cfg is None and validation is None:
        raise SpadeError(f"{model.registry_name} is an unrolled model: {precision} changes its output and is taken only "
                         "after a quality check on a validation split (benchmarks/precision.py); use fp32")
    dev = require_device(device)
    if precision not in ("auto", "fp32") and model.solver_cfg is None:  # checked on the validation split
        check = check_unrolled_precision(model, *validation, precision)
        if not check.accepted:
            raise SpadeError(f"{model.registry_name}: {check.reason}; use fp32")
        deployed = low_precision(model, DTYPES[precision]).to(dev)
        deployed.precision, deployed.engine_label = precision, f"channels-last {precision}"
        deployed.precision_check = check.reason
        return deployed
    if backend == "tensorrt" and dev.type != "cuda":
        raise SpadeError("the tensorrt back-end runs on a CUDA GPU: use --device cuda")
    if backend == "auto":
        if manifest_path is not None:  # the engines it may pick must belong to this model
            verify_export(model, "onnxruntime", manifest_path, checkpoint_sha256)
        # Deploy-time widths: a pruned prior padded with zero filters to the widths this device runs fastest.
        model = deploy_widths(model, device, shape=shape, sample=sample)
        return deploy_auto(model, manifest_path, device, shape=shape, sample=sample, precision=precision)
    if backend == "torch":
        if precision in ("auto", "fp32"):
            return placed(model, dev)  # the model as it is: eager NCHW fp32 (Reconstructor.engine_label)
        deployed = apply_precision(copy.deepcopy(model).to(dev).eval(), model, precision, str(dev))
        deployed.engine_label = f"eager NCHW {precision}->fp32"
        return deployed
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
    if precision not in ("auto", "fp32"):
        apply_precision(deployed, model, precision, device)
    deployed.engine_label = engine_label(backend, deployed.precision)
    return deployed
