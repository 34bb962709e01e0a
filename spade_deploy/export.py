"""Export each prior to ONNX (and TensorRT), checked against PyTorch, with a JSON manifest.

One ONNX file per prior with dynamic batch / height / width. Every export is checked: the ONNX
checker, then onnxruntime against PyTorch on fresh random input of another size than the tracing
example; the maximum relative error ``max|ort - torch| / max|torch|`` goes into the manifest.
TensorRT is optional and imported inside the function that needs it.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import SpadeError
from .io import atomic_path, write_json
from .models import Reconstructor, count_parameters
from .paths import sha256_file

OPSET = 17
INPUT, OUTPUT = "x", "y"
DYNAMIC_AXES = {INPUT: {0: "batch", 2: "height", 3: "width"}, OUTPUT: {0: "batch", 2: "height", 3: "width"}}


@dataclass
class PriorExport:
    name: str
    onnx: str
    params: int
    max_rel_error: float
    check_shape: list[int]
    engine: str | None = None
    engine_precision: str | None = None
    sha256: str | None = None  # of the ONNX file: a deployment runs exactly the file exported


@dataclass
class ExportResult:
    manifest_path: Path
    priors: list[PriorExport] = field(default_factory=list)


def onnx_session(path: str | Path, device: str = "cpu"):
    """An onnxruntime session tuned for latency inside a loop (all graph optimisations, torch's thread count, no spinning)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    # The outer loop runs torch operators between prior calls: threads spinning after a call
    # would take the cores from them (a DEQ slice on 2 cores: 888 -> 626 ms without spinning).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SpadeError("onnxruntime has no CUDA provider here (pip install 'spade-deploy[gpu]')")
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def max_relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-30))


def export_onnx(
    model: Reconstructor,
    out_dir: str | Path,
    stem: str,
    opset: int = OPSET,
    example_size: tuple[int, int] = (64, 64),
    check_size: tuple[int, int, int] = (2, 80, 96),
    source: str | None = None,
    extra: dict | None = None,
) -> ExportResult:
    """Write ``<out_dir>/<stem>.<prior>.onnx`` per prior and ``<out_dir>/<stem>.manifest.json``."""
    import onnx

    check_opset(opset)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpadeError(f"output path {out} is a file, expected a folder")
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    exports = []
    for name, prior in model.priors().items():
        prior = prior.eval()
        example = model.prior_example_input(name, *example_size)
        path = out / f"{stem}.{name}.onnx"
        with atomic_path(path) as tmp, warnings.catch_warnings():
            # The TorchScript exporter needs no onnxscript and handles dynamic H / W convolutions.
            warnings.simplefilter("ignore", DeprecationWarning)
            # VarNet's U-Net: InstanceNorm without running statistics always normalises with the
            # input's (what "train=True" means), and its odd-size padding test is traced as a
            # constant (never taken at NormUnet's multiples of 16). The check below on another
            # input size catches any export these would make wrong.
            warnings.filterwarnings("ignore", message=".*operator 'instance_norm' is set to train=True")
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(
                prior, (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes=DYNAMIC_AXES, opset_version=opset, dynamo=False,
            )
            onnx.checker.check_model(onnx.load(str(tmp)), full_check=True)
        b, h, w = check_size
        fresh = torch.randn(b, example.shape[1], h, w, generator=torch.Generator().manual_seed(1234))
        with torch.no_grad():
            ref = prior(fresh).numpy()
        got = onnx_session(path).run([OUTPUT], {INPUT: fresh.numpy()})[0]
        exports.append(PriorExport(name, path.name, count_parameters(prior), max_relative_error(ref, got), list(fresh.shape),
                                   sha256=sha256_file(path)))
    manifest = {
        "model": model.registry_name,
        "config": dataclasses.asdict(model.config),
        "source": source,
        "opset": opset,
        "precision": "fp32",
        "input": INPUT,
        "output": OUTPUT,
        "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in DYNAMIC_AXES.items()},
        "priors": [dataclasses.asdict(e) for e in exports],
        **(extra or {}),
    }
    mpath = write_json(out / f"{stem}.manifest.json", manifest)
    return ExportResult(mpath, exports)


def max_opset() -> int:
    """The newest opset both the installed ``onnx`` and torch's TorchScript exporter support."""
    import onnx
    from torch.onnx import _constants

    torch_max = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", OPSET))
    return min(int(onnx.defs.onnx_opset_version()), int(torch_max))


def check_opset(opset: int) -> int:
    if isinstance(opset, bool) or not isinstance(opset, int) or not OPSET <= opset <= max_opset():
        raise SpadeError(f"ONNX opset {opset!r} is not supported here: choose {OPSET}..{max_opset()}")
    return opset


_SHA256 = frozenset("0123456789abcdef")


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _SHA256


def member_path(root: str | Path, name, where: str) -> Path:
    """``root / name`` for a file name read from a manifest, refusing anything outside ``root``
    (absolute paths, ``..``, or a symbolic link leading out)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise SpadeError(f"{where}: file name {name!r} is not a file name")
    rel = Path(name)
    if rel.is_absolute() or name.startswith(("/", "\\")) or ".." in rel.parts or ".." in name.split("\\"):
        raise SpadeError(f"{where}: file {name!r} is outside the manifest's folder; only files beside it are used")
    root = Path(root)
    path = root / rel
    if root.resolve() not in path.resolve().parents:
        raise SpadeError(f"{where}: file {name!r} resolves outside the manifest's folder; only files beside it are used")
    return path


def validate_export_manifest(manifest, path: str | Path) -> dict:
    """Check an export manifest's structure before anything in it is used: the model name, the
    tensor names the priors were exported with, one entry per prior with its file inside the
    manifest's folder, and hashes where recorded. One-line :class:`SpadeError` otherwise."""
    where = str(path)
    if not isinstance(manifest, dict):
        raise SpadeError(f"{where}: an export manifest must be a JSON object")
    if not isinstance(manifest.get("model"), str):
        raise SpadeError(f"{where}: the manifest names no model")
    for key, expected in (("input", INPUT), ("output", OUTPUT)):
        if manifest.get(key) != expected:
            raise SpadeError(f"{where}: {key} tensor {manifest.get(key)!r} is not the exported one ({expected!r})")
    sha = manifest.get("checkpoint_sha256")
    if sha is not None and not _is_sha256(sha):
        raise SpadeError(f"{where}: checkpoint_sha256 is not a SHA-256 hex digest")
    priors = manifest.get("priors")
    if not isinstance(priors, list) or not priors:
        raise SpadeError(f"{where}: the manifest lists no priors")
    names = set()
    for entry in priors:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise SpadeError(f"{where}: a prior entry has no name")
        if entry["name"] in names:
            raise SpadeError(f"{where}: prior {entry['name']!r} is listed twice")
        names.add(entry["name"])
        member_path(Path(path).parent, entry.get("onnx"), where)
        if entry.get("engine") is not None:
            member_path(Path(path).parent, entry["engine"], where)
        for key in ("sha256", "engine_sha256"):
            if entry.get(key) is not None and not _is_sha256(entry[key]):
                raise SpadeError(f"{where}: {key} of prior {entry['name']!r} is not a SHA-256 hex digest")
    return manifest


def read_export_manifest(path: str | Path) -> dict:
    """Read and validate an export manifest (:func:`validate_export_manifest`)."""
    path = Path(path)
    if not path.exists():
        raise SpadeError(f"export manifest not found: {path} (run `spade export` first)")
    if not path.is_file():
        raise SpadeError(f"export manifest {path} is not a file")
    if path.stat().st_size > 16 << 20:
        raise SpadeError(f"{path} is too large to be an export manifest")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SpadeError(f"{path} is not valid JSON") from None
    return validate_export_manifest(manifest, path)


def require_tensorrt():
    """The ``tensorrt`` module, or a one-line error saying why it cannot be used here."""
    try:
        import tensorrt as trt
    except ImportError:
        raise SpadeError("TensorRT is not installed: pip install 'spade-deploy[gpu]' on a machine with an NVIDIA GPU") from None
    if not torch.cuda.is_available():
        raise SpadeError("TensorRT needs a CUDA GPU, and none is visible here")
    return trt


def build_trt_engines(
    manifest_path: str | Path,
    fp16: bool = False,
    min_shape: tuple[int, int, int] = (1, 32, 32),
    opt_shape: tuple[int, int, int] = (1, 320, 320),
    max_shape: tuple[int, int, int] = (8, 768, 768),
    workspace_gb: float = 4.0,
) -> dict:
    """Build a TensorRT engine (FP32, or FP16) for every prior in an export manifest."""
    trt = require_tensorrt()
    manifest_path = Path(manifest_path)
    manifest = read_export_manifest(manifest_path)
    logger = trt.Logger(trt.Logger.WARNING)
    for entry in manifest["priors"]:
        onnx_path = member_path(manifest_path.parent, entry["onnx"], str(manifest_path))
        if entry.get("sha256") and sha256_file(onnx_path) != entry["sha256"]:
            raise SpadeError(f"{onnx_path} is not the file exported for prior {entry['name']!r} (its hash differs)")
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise SpadeError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        c = 2
        profile.set_shape(manifest["input"], (min_shape[0], c, *min_shape[1:]), (opt_shape[0], c, *opt_shape[1:]),
                          (max_shape[0], c, *max_shape[1:]))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise SpadeError(f"TensorRT failed to build an engine for {onnx_path}")
        engine_path = onnx_path.with_suffix(".fp16.engine" if fp16 else ".fp32.engine")
        with atomic_path(engine_path) as tmp:
            tmp.write_bytes(bytes(serialized))
        entry["engine"] = engine_path.name
        entry["engine_sha256"] = sha256_file(engine_path)
        entry["engine_precision"] = "fp16" if fp16 else "fp32"
        entry["engine_profile"] = {"min": list(min_shape), "opt": list(opt_shape), "max": list(max_shape)}
    write_json(manifest_path, manifest)
    return manifest


__all__ = ["export_onnx", "build_trt_engines", "read_export_manifest", "validate_export_manifest", "member_path",
           "check_opset", "max_opset", "onnx_session", "max_relative_error"]
