"""The export cache: where a checkpoint's exported priors are kept, under which names, and when an
existing export can be reused (an intact export of exactly this checkpoint file, by SHA-256), so
that ``spade bench``, ``spade reconstruct`` and the demo export each checkpoint once.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import load_model
from ..errors import SpadeError
from ..models import Reconstructor
from ..paths import check_out_dir, check_outputs, default_cache_dir, sha256_file
from ..progress import Reporter
from .export import build_trt_engines, check_opset, export_onnx, read_export_manifest
from .priors import require_tensorrt
from .runtime import deploy, verify_export


def export_stem(checkpoint: Path) -> str:
    """Run folders hold files named best.safetensors: name exports after folder and file."""
    return f"{checkpoint.parent.name}.{checkpoint.stem}" if checkpoint.stem in ("best", "last") else checkpoint.stem


def export_stems(checkpoints: list[Path]) -> dict[Path, str]:
    """Distinct export names for checkpoints benchmarked together: :func:`export_stem`, and for
    checkpoints whose names clash, their path below the clashing ones' common folder (the demo's
    ``<out>/varnet/base/best`` and ``<out>/e2e-varnet/base/best`` -> ``varnet.base.best``,
    ``e2e-varnet.base.best``; one name for two would make one model's priors replace the other's).
    The same file named twice keeps one name."""
    stems = {path: export_stem(path) for path in dict.fromkeys(checkpoints)}
    files = {stem: {p.resolve() for p in stems if stems[p] == stem} for stem in set(stems.values())}
    clashing = [p for p in stems if len(files[stems[p]]) > 1]
    if clashing:
        root = Path(os.path.commonpath([p.resolve().parent for p in clashing]))
        for path in clashing:
            stems[path] = ".".join(path.resolve().relative_to(root).with_suffix("").parts)
    return stems


def fresh_export(net, checkpoint_sha256: str, engines: Path, stem: str, backends, size=None) -> Path | None:
    """The manifest ``engines/<stem>.manifest.json`` when it is an export of exactly this checkpoint
    (same SHA-256) with every file the back-ends need intact; None when there is none or it was
    exported from another version of the checkpoint (export again). A manifest that is malformed,
    or whose files differ from the ones it records, is an error: it is never silently replaced."""
    mpath = engines / f"{stem}.manifest.json"
    if not mpath.exists():
        return None
    man = read_export_manifest(mpath)
    if man.get("checkpoint_sha256") != checkpoint_sha256:
        return None
    if "tensorrt" in backends and not all(p.get("engine") and p.get("engine_image_size") == list(size or ())
                                          for p in man["priors"]):
        return None
    for b in backends:
        if b != "torch":
            verify_export(net, "onnxruntime" if b == "auto" else b, mpath, checkpoint_sha256)
    return mpath


def export_files(net, out: Path, stem: str) -> list[Path]:
    return [out / f"{stem}.manifest.json", *(out / f"{stem}.{name}.onnx" for name in net.priors())]


def export_checkpoint(checkpoint: Path, out: Path, trt: bool = False, fp16: bool = False, opset: int = 17,
                      stem: str | None = None, size: tuple[int, int] | None = None):
    """Export every prior of ``checkpoint`` to ONNX in ``out`` (checked against PyTorch), bound to
    the checkpoint's SHA-256; with ``trt`` also TensorRT engines for images of ``size``. Returns the
    :class:`~spade_deploy.deploy.export.ExportResult`."""
    check_opset(opset)
    check_out_dir(out)
    if trt:  # fail before writing anything when TensorRT cannot run here
        require_tensorrt()
        if size is None:
            raise SpadeError("--trt needs --size HxW: the slices' k-space size, which the engines' profile is built for")
    net, manifest = load_model(checkpoint)
    stem = stem or export_stem(checkpoint)
    check_outputs(files=export_files(net, out, stem), folders=[out], inputs=[checkpoint])
    res = export_onnx(net, out, stem, opset=opset, source=str(checkpoint),
                      extra={"checkpoint_sha256": sha256_file(checkpoint), "pruning": manifest.get("pruning"),
                             "finetune": manifest.get("finetune")})
    if trt:
        build_trt_engines(res.manifest_path, net, size, fp16=fp16)
    return res


def export_for(checkpoint: Path, net, engines: Path, backends, size=None, data=()) -> tuple[Path, str]:
    """The export cache: the export manifest of ``checkpoint`` for ``backends`` in ``engines``
    (exported first unless an intact export of exactly this checkpoint is there) and the
    checkpoint's SHA-256 it is bound to."""
    stem = export_stem(checkpoint)
    sha = sha256_file(checkpoint)
    check_out_dir(engines)
    check_outputs(files=export_files(net, engines, stem), folders=[engines], inputs=[checkpoint], data=data)
    mpath = fresh_export(net, sha, engines, stem, backends, size=size)
    if mpath is None:
        mpath = export_checkpoint(checkpoint, engines, trt="tensorrt" in backends, stem=stem, size=size).manifest_path
    return mpath, sha


def default_engines_dir() -> Path:
    """Where ``spade reconstruct`` keeps the priors it exports on the fly: the cache home's
    ``spade-deploy/engines``, never the current folder."""
    return default_cache_dir() / "engines"


def deployed_checkpoint(checkpoint: Path, net: Reconstructor, backend: str, engines: Path | None, data,
                        reporter: Reporter, shape: tuple[int, int] | None = None, sample=None) -> Reconstructor:
    """``net``, loaded from ``checkpoint``, with its priors on ``backend`` (on the CPU): every
    back-end but torch runs the export of this checkpoint in ``engines`` (default
    :func:`default_engines_dir`; exported first where missing, never into the ``data`` folders);
    ``auto`` picks the engine measured fastest for images of ``shape`` (or those of ``sample``)
    and tells ``reporter`` which it picked."""
    if backend == "torch":  # the model as it is, or its precision schedule where one is asked for
        net = deploy(net, "torch", None, "cpu")
    else:
        engines = engines if engines is not None else default_engines_dir()
        mpath, sha = export_for(checkpoint, net, engines, [backend], data=data)
        net = deploy(net, backend, mpath, "cpu", shape=shape, sample=sample, checkpoint_sha256=sha)
    if getattr(net, "engine_choice", None):
        reporter.note("priors on: " + ", ".join(sorted(set(net.engine_choice.values()))) + " (measured fastest here)")
    if net.precision != "fp32":
        reporter.note(f"precision: {net.precision} (low precision first, FP32 to the tolerance)")
    return net
