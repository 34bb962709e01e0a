"""Export each prior to ONNX (and TensorRT), checked against PyTorch, with a JSON manifest.

One ONNX file per prior with dynamic batch / height / width. Every export is checked: the ONNX
checker, then onnxruntime against PyTorch on fresh random input of another size than the tracing
example; the maximum relative error ``max|ort - torch| / max|torch|`` goes into the manifest.
TensorRT is optional and imported inside the function that needs it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import onnx
from torch.onnx import _constants

from ..device import set_tf32
from ..errors import SpadeError
from ..io import atomic_path, write_json
from ..models import Reconstructor, count_parameters
from ..paths import sha256_file
from .priors import TrtPrior, onnx_session, require_tensorrt

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


def trt_profile(model: Reconstructor, name: str, image_size: tuple[int, int], max_batch: int) -> dict[str, list[int]]:
    """The optimisation profile of one prior's engine: the prior's real input (its channels, and
    the size it sees for ``image_size`` slices, e.g. VarNet's padding to multiples of 16), batch
    1 to ``max_batch``, optimised for one slice."""
    if max_batch < 1:
        raise SpadeError("TensorRT engines need a maximum batch of at least 1")
    _, c, h, w = model.prior_example_input(name, *image_size).shape
    return {"min": [1, c, h, w], "opt": [1, c, h, w], "max": [max_batch, c, h, w]}


def build_trt_engines(
    manifest_path: str | Path,
    model: Reconstructor,
    image_size: tuple[int, int],
    fp16: bool = False,
    max_batch: int = 4,
    workspace_gb: float = 4.0,
    allow_tf32: bool = False,
    tolerance: float | None = None,
) -> dict:
    """Build a TensorRT engine (FP32, or FP16) for every prior in an export manifest, each checked.

    ``model`` is the exported model, ``image_size`` the slices' (H, W) (the profile's shape, see
    :func:`trt_profile`). Every engine runs on fresh random input against the PyTorch prior on the
    same GPU; the maximum relative error, the precision, the TensorRT version and the GPU go into
    the manifest, and an error above ``tolerance`` (default 1e-3 FP32, 2e-2 FP16) refuses the
    engine. TF32 stays off unless ``allow_tf32`` (in TensorRT and in the PyTorch reference)."""
    trt = require_tensorrt()
    set_tf32(allow_tf32)
    tolerance = tolerance if tolerance is not None else (2e-2 if fp16 else 1e-3)
    precision = "fp16" if fp16 else "fp32"
    manifest_path = Path(manifest_path)
    manifest = read_export_manifest(manifest_path)
    if manifest.get("model") != model.registry_name:
        raise SpadeError(f"{manifest_path} was exported from a {manifest.get('model')!r}, not a {model.registry_name!r}")
    dev = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(dev)
    priors = model.priors()
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
        if not allow_tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        shapes = trt_profile(model, entry["name"], image_size, max_batch)
        profile = builder.create_optimization_profile()
        profile.set_shape(manifest["input"], shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise SpadeError(f"TensorRT failed to build an engine for {onnx_path}")
        engine_path = onnx_path.with_suffix(f".{precision}.engine")
        with atomic_path(engine_path) as tmp:
            tmp.write_bytes(bytes(serialized))
        # Parity on fresh input of the profile's largest batch, as for the ONNX files.
        fresh = torch.randn(*shapes["max"], generator=torch.Generator().manual_seed(1234)).to(dev)
        prior = copy.deepcopy(priors[entry["name"]]).to(dev).eval()
        with torch.no_grad():
            ref = prior(fresh)
            got = TrtPrior(engine_path, manifest["input"], manifest["output"], str(dev))(fresh)
        err = max_relative_error(ref.cpu().numpy(), got.cpu().numpy())
        if not err <= tolerance:
            engine_path.unlink(missing_ok=True)
            raise SpadeError(f"TensorRT {precision} engine for {entry['name']!r} differs from PyTorch by {err:.1e} "
                             f"(relative), above {tolerance:g}")
        entry.update(engine=engine_path.name, engine_precision=precision, engine_profile=shapes,
                     engine_image_size=list(image_size), engine_sha256=sha256_file(engine_path),
                     engine_max_rel_error=err, engine_check_shape=list(fresh.shape))
    manifest.update(precision=precision, tensorrt=str(trt.__version__), gpu=gpu, tf32=allow_tf32)
    write_json(manifest_path, manifest)
    return manifest


__all__ = ["export_onnx", "build_trt_engines", "trt_profile", "read_export_manifest",
           "validate_export_manifest", "member_path", "check_opset", "max_opset", "max_relative_error"]
