"""GPU benchmark: the small and paper-size DEQ, VarNet and E2E-VarNet, unpruned and pruned at 0.4, on
every engine present on the machine, each against the unpruned model in eager FP32 PyTorch.

    python benchmarks/gpu_bench.py --data DIR [--out benchmarks/results] [--budget 300]   # the GPU run (benchmarks/gpu.sh)
    python benchmarks/gpu_bench.py --make-data DIR        # a trimmed copy of the embedded test split (needs nilearn)
    python benchmarks/gpu_bench.py --cpu-dry-run --data DIR --out /tmp/x   # every code path but CUDA, tiny models

Models. ``deq-small``: the shipped small DEQ (``spade_deploy/weights/deq-small.safetensors``,
trained on the embedded dataset). ``deq-paper``, ``varnet``, ``e2e-varnet``: the paper presets with
random-initialised weights (training them is not part of a device run): their latencies are real,
their PSNR is not a reconstruction quality, and a random DEQ may stop on its iteration cap (the
iterations column says so). Pruned = per-layer ratio 0.4 (L1, torch-pruning), not fine-tuned.

Engines, each run only where present and otherwise listed with the reason, never substituted:
``torch`` (eager FP32, TF32 off: the reference of every speed-up), ``channels-last`` (weights and
activations NHWC), ``compiled`` (each prior through ``torch.compile``), ``compiled-whole`` (a DEQ's
whole iteration, a VarNet's whole forward pass, through ``torch.compile``), ``cuda-graph`` (each prior
through ``torch.compile(mode="reduce-overhead")``, i.e. replayed CUDA graphs), ``fp16`` / ``bf16``
(priors in that precision, the loop in FP32; a DEQ's only where its residual still meets the
tolerance on the timing slice, checked by :func:`spade_deploy.deploy.runtime.check_precision`),
``onnxruntime`` (the CUDA provider of onnxruntime-gpu, asserted active) and ``tensorrt`` (FP32
engines built for the data's shape and checked against PyTorch).

Timing and quality are :func:`spade_deploy.bench.run_bench`'s: median of whole reconstructions of
the first test slice after warm-up (CUDA events), PSNR / SSIM over the test split.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from spade_deploy import bench as B  # noqa: E402
from spade_deploy.checkpoint import load_model  # noqa: E402
from spade_deploy.mri.reader import SliceDataset  # noqa: E402
from spade_deploy.device import placed, require_device, to_device  # noqa: E402
from spade_deploy.errors import SpadeError  # noqa: E402
from spade_deploy.io import write_json, write_text  # noqa: E402
from spade_deploy.models import build_model  # noqa: E402
from spade_deploy.mri.physics import center_fraction_for  # noqa: E402
from spade_deploy.prune import prune_model  # noqa: E402
from spade_deploy.deploy.runtime import check_precision, deploy, low_precision  # noqa: E402
from spade_deploy.mri.task import MRITask  # noqa: E402

ACCELERATION = 6
RATIO = 0.4
ENGINES = ("torch", "channels-last", "compiled", "compiled-whole", "cuda-graph", "fp16", "bf16", "onnxruntime", "tensorrt")
SHIPPED = ROOT / "spade_deploy" / "weights" / "deq-small.safetensors"


class Absent(Exception):
    """An engine that is not present, not applicable or refused here: listed with this reason."""


# -- models ------------------------------------------------------------------------------------
def families(dry_run: bool) -> list[tuple[str, str, list]]:
    """``(name, weights, [(ratio, model), ...])`` per model family."""
    out = []
    small, _ = load_model(SHIPPED)
    out.append(("deq-small", f"shipped ({SHIPPED.name})", small))
    torch.manual_seed(0)
    big = "tiny" if dry_run else "paper"
    out.append(("deq-paper", f"random-initialised ({big} preset, seed 0)", build_model("deq", preset=big)))
    for name in ("varnet", "e2e-varnet"):
        out.append((name, f"random-initialised ({big} preset, seed 0)", build_model(name, preset=big)))
    result = []
    for name, weights, model in out:
        pruned, _ = prune_model(model.eval(), RATIO)
        result.append((name, weights, [(0.0, model.eval()), (RATIO, pruned.eval())]))
    return result


# -- engines -----------------------------------------------------------------------------------
def _with_priors(model, wrap):
    deployed = copy.deepcopy(model).eval()
    for name, prior in model.priors().items():
        deployed.set_prior(name, wrap(copy.deepcopy(prior)))
    return deployed


class _Graphed(torch.nn.Module):
    """A prior compiled with CUDA graphs; each output is copied out of the graph's pool (the solver
    keeps earlier outputs, which the next replay would overwrite)."""

    def __init__(self, prior):
        super().__init__()
        self.prior = prior
        self.fn = torch.compile(prior, mode="reduce-overhead")

    def forward(self, x):
        torch.compiler.cudagraph_mark_step_begin()
        return self.fn(x).clone()


def _compiled_whole(model):
    """One compiled graph per iteration: a DEQ's whole fixed-point map ``T`` (data consistency and
    prior; the device-resident loop calls it on the whole batch), a VarNet's whole forward pass
    (every cascade)."""
    m = copy.deepcopy(model).eval()
    if m.solver_cfg is not None:
        cls_operator = type(m).operator

        def operator(physics, y):
            return torch.compile(cls_operator(m, physics, y), dynamic=False)

        m.operator = operator
    else:
        m.forward = torch.compile(m.forward, dynamic=False)
    return m


def build_engine(engine: str, model, dev: torch.device, work: Path, size: tuple[int, int], check_input, notes: dict):
    """``model`` deployed on ``engine`` on ``dev``, or :class:`Absent` with the reason; what the
    table should say about it goes into ``notes[engine]``."""
    cuda = dev.type == "cuda"
    if engine == "torch":
        return placed(model, dev)
    if engine == "channels-last":
        return copy.deepcopy(model).to(dev, memory_format=torch.channels_last)
    if engine in ("compiled", "compiled-whole", "cuda-graph"):
        if not cuda:
            raise Absent("absent: CUDA only in this benchmark")
        if engine == "compiled":
            return _with_priors(model, torch.compile).to(dev)
        if engine == "compiled-whole":
            return _compiled_whole(model).to(dev)
        return _with_priors(model, _Graphed).to(dev)
    if engine in ("fp16", "bf16"):
        if not cuda and engine == "fp16":
            raise Absent("absent: fp16 convolutions are a GPU feature")
        dtype = torch.float16 if engine == "fp16" else torch.bfloat16
        if model.solver_cfg is not None:
            y, physics = check_input
            report = check_precision(placed(model, dev), y, physics, engine, raise_on_failure=False)
            fp32 = check_precision(placed(model, dev), y, physics, "fp32", raise_on_failure=False)
            said = (f"{engine} residual {max(report.final_residual):.1e} after {max(report.iterations)} iterations, "
                    f"fp32 {max(fp32.final_residual):.1e} after {max(fp32.iterations)}, tol {report.tol:g}")
            if fp32.converged and not report.converged:
                raise Absent(f"refused: {said}")
            notes[engine] = said if fp32.converged else f"{said}: fp32 does not converge either (these weights), both timed on the cap"
        return low_precision(model, dtype).to(dev)
    if engine == "onnxruntime":
        if importlib.util.find_spec("onnxruntime") is None:
            raise Absent("absent: onnxruntime not installed")
        import onnxruntime as ort

        if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Absent(f"absent: onnxruntime {ort.__version__} here is the CPU build (onnxruntime-gpu not installed)")
        from spade_deploy.deploy.export import export_onnx

        folder = Path(tempfile.mkdtemp(dir=work))
        res = export_onnx(model, folder, "m", example_size=size)
        return deploy(model, "onnxruntime", res.manifest_path, str(dev))
    if engine == "tensorrt":
        if not cuda:
            raise Absent("absent: CUDA only")
        if importlib.util.find_spec("tensorrt") is None:
            raise Absent("absent: TensorRT not installed")
        from spade_deploy.deploy.export import build_trt_engines, export_onnx

        folder = Path(tempfile.mkdtemp(dir=work))
        res = export_onnx(model, folder, "m", example_size=size)
        build_trt_engines(res.manifest_path, model, size, max_batch=4)
        return deploy(model, "tensorrt", res.manifest_path, str(dev))
    raise ValueError(engine)


# -- the run -----------------------------------------------------------------------------------
def run(data: Path, out: Path, dev: torch.device, engines: list[str], budget_s: float, repeats: int, dry_run: bool) -> list[Path]:
    t_start = time.monotonic()
    test = SliceDataset(data)
    cf = center_fraction_for(ACCELERATION)
    task = MRITask(ACCELERATION, cf)
    batch = task.eval_batch(next(iter(task.loader(test, 1, shuffle=False, seed=0))))
    check_input = to_device((batch.y, batch.physics), dev)
    size = tuple(batch.y.shape[-2:])
    device_name = B.describe_device(dev)
    suffix = "cpu-dry-run" if dry_run else "gpu"
    written = []
    work = Path(tempfile.mkdtemp(prefix="spade-gpu-bench-"))
    for family, weights, models in families(dry_run):
        status: dict[str, str] = {}
        left = budget_s - (time.monotonic() - t_start)
        md_head = [f"# {family} on {device_name}", "",
                   f"Weights: {weights}; pruned = ratio {RATIO:g} (L1, torch-pruning), not fine-tuned. "
                   f"Acceleration {ACCELERATION}, test data {data} ({len(test)} slices of {size[0]}x{size[1]}). "
                   f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}, TF32 "
                   f"{'on' if torch.backends.cudnn.allow_tf32 else 'off'}" if dev.type == "cuda" else "") + ".", ""]
        if left <= 0:
            status = {e: "not run: time budget spent" for e in engines}
            write_text(out / f"{family}-{suffix}.md", "\n".join(md_head + _status_lines(status)) + "\n")
            write_json(out / f"{family}-{suffix}.json", {"device": device_name, "weights": weights, "engines": status, "rows": []})
            written.append(out / f"{family}-{suffix}.md")
            continue
        deployed: dict[tuple[float, str], object] = {}
        for engine in engines:
            if time.monotonic() - t_start > budget_s:
                status[engine] = "not run: time budget spent"
                continue
            t0 = time.monotonic()
            try:
                notes: dict[str, str] = {}
                built = {}
                for ratio, m in models:
                    built[ratio] = build_engine(engine, m, dev, work, size, check_input, notes)
                    if engine in notes:
                        notes[f"{ratio:g}"] = notes.pop(engine)
                with torch.no_grad():  # one reconstruction each: an engine that fails here is listed, not timed
                    for m in built.values():
                        m.eval()(*check_input)
                deployed.update({(ratio, engine): m for ratio, m in built.items()})
                said = "; ".join(f"ratio {r}: {n}" for r, n in notes.items())
                status[engine] = f"ran (built in {time.monotonic() - t0:.1f} s{'; ' + said if said else ''})"
            except Absent as e:
                status[engine] = str(e)
            except Exception as e:  # noqa: BLE001 -- a failing engine is reported, the others still run
                status[engine] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
        ran = [e for e in engines if (0.0, e) in deployed]
        variants = [B.Variant(family, ratio, "none" if ratio else None, m) for ratio, m in models]
        by_model = {id(v.model): v.ratio for v in variants}
        backends = {e: (lambda v, e=e: deployed[(by_model[id(v.model)], e)]) for e in ran}
        result = None
        if "torch" in ran:
            result = B.run_bench(variants, backends, test, MRITask(ACCELERATION, cf), repeats=repeats, warmup=2, device=str(dev))
        md = md_head + _status_lines(status) + [""]
        payload = {"device": device_name, "weights": weights, "engines": status, "torch": torch.__version__,
                   "cuda": torch.version.cuda if dev.type == "cuda" else None}
        if result is not None:
            cols = B.columns(result)
            md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            md += ["| " + " | ".join(row) + " |" for row in B.table_rows(result)]
            payload.update(result.as_dict())
        else:
            md += ["No table: the eager FP32 reference did not run."]
        write_text(out / f"{family}-{suffix}.md", "\n".join(md) + "\n")
        write_json(out / f"{family}-{suffix}.json", payload)
        written.append(out / f"{family}-{suffix}.md")
        print(f"{family}: {time.monotonic() - t_start:.0f} s elapsed", flush=True)
    return written


def _status_lines(status: dict[str, str]) -> list[str]:
    return ["Engines:", ""] + [f"- `{e}`: {s}" for e, s in status.items()]


def make_data(dest: Path, slices: int, volumes: int, size: int | None = None) -> None:
    """The embedded dataset's test split (seed 0, as `spade data` builds it), first ``volumes``
    volumes, first ``slices`` slices each: what the device run scores and times. ``size``: a
    smaller simulated matrix instead (for the CPU dry run)."""
    import h5py

    from spade_deploy.mri.simulate import SimConfig, build_default_dataset

    config = None
    if size is not None:
        config = SimConfig(train_volumes=1, train_slices=1, val_volumes=1, val_slices=1, test_volumes=volumes,
                           test_slices=slices, size=size)
    with tempfile.TemporaryDirectory() as tmp:
        info = build_default_dataset(Path(tmp) / "default", seed=0, config=config)
        dest.mkdir(parents=True, exist_ok=True)
        for src in sorted((info.root / "test").glob("*.h5"))[:volumes]:
            with h5py.File(src, "r") as f, h5py.File(dest / src.name, "w") as g:
                for key, value in f.items():
                    if value.ndim >= 3:  # compressed: the folder travels to the device within a size limit
                        g.create_dataset(key, data=value[:slices], compression="gzip", compression_opts=9, shuffle=True)
                    else:
                        g[key] = value[()]
                g.attrs.update(dict(f.attrs))


def main() -> None:
    from spade_deploy.hostmem import keep_freed_memory

    keep_freed_memory()  # as the spade command runs
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, help="folder of fastMRI-format test files (--make-data's output)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds; engines and models not started by then are listed as not run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU, tiny paper-size stand-ins: checks every code path but CUDA")
    ap.add_argument("--make-data", type=Path, metavar="DIR")
    ap.add_argument("--slices", type=int, default=2)
    ap.add_argument("--volumes", type=int, default=1)
    ap.add_argument("--size", type=int, help="--make-data: simulate this matrix size instead of the embedded dataset's")
    args = ap.parse_args()
    try:
        if args.make_data:
            make_data(args.make_data, args.slices, args.volumes, args.size)
            return
        if args.data is None:
            raise SpadeError("--data DIR is needed (benchmarks/gpu.sh --prepare makes it)")
        dev = require_device("cpu" if args.cpu_dry_run else "cuda")
        paths = run(args.data, args.out, dev, args.engines, args.budget, args.repeats, args.cpu_dry_run)
        print("results: " + ", ".join(str(p) for p in paths))
    except SpadeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
