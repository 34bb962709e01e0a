"""GPU benchmark: the small and paper-size DEQ, VarNet and E2E-VarNet, unpruned and pruned at 0.4, on
every engine present on the machine, each against the unpruned model in eager FP32 PyTorch.

    python benchmarks/gpu_bench.py --data DIR --maps CACHE [--out benchmarks/results] [--budget 240]   # the GPU run (benchmarks/gpu.sh)
    python benchmarks/gpu_bench.py --make-data DIR        # a trimmed copy of the embedded test split (needs nilearn)
    python benchmarks/gpu_bench.py --make-maps --data DIR --maps CACHE   # its ESPIRiT coil maps (needs sigpy)
    python benchmarks/gpu_bench.py --cpu-dry-run --data DIR --maps CACHE --out /tmp/x   # every code path but CUDA, tiny models

Coil maps: the device has no sigpy, so the maps of the test slices are computed here
(``--make-maps``, by the library's own estimator and cache) and carried; ``--maps`` reads them from
that cache only, and a missing one is an error before any engine runs, never a silent fallback.

Models. ``deq-small``: the shipped small DEQ (``spade_deploy/weights/deq-small.safetensors``,
trained on the embedded dataset). ``deq-paper``, ``varnet``, ``e2e-varnet``: the paper presets with
random-initialised weights (training them is not part of a device run): their latencies are real,
their PSNR is not a reconstruction quality, and a random DEQ may stop on its iteration cap (the
iterations column says so). Pruned = per-layer ratio 0.4 (L1, torch-pruning), not fine-tuned.

Engines, each run only where present and otherwise listed with the reason, never substituted:
``torch`` (eager FP32, TF32 off: the reference of every speed-up), ``channels-last`` (weights and
activations NHWC), ``compiled`` (each prior through ``torch.compile``), ``compiled-whole`` (a DEQ's
whole iteration ``DEQ.iteration``, a VarNet's whole forward pass, each one graph through
``torch.compile(fullgraph=True)``, the same graph for every slice's operator; the table gives the
graphs compiled), ``cuda-graph`` (each prior
through ``torch.compile(mode="reduce-overhead")``, i.e. replayed CUDA graphs), ``fp16`` / ``bf16``
(priors in that precision, the loop in FP32; a DEQ's only where its residual still meets the
tolerance on the timing slice, checked by :func:`spade_deploy.deploy.runtime.check_precision`),
``onnxruntime`` (the CUDA provider of onnxruntime-gpu, asserted active) and ``tensorrt`` (FP32
engines built for the data's shape and checked against PyTorch).

Timing and quality are :func:`spade_deploy.bench.run_bench`'s: median of whole reconstructions of
the first test slice after warm-up (CUDA events), PSNR / SSIM over the test split.

Results: one Markdown and one JSON file for all models (``gpu.md`` / ``gpu.json``, or
``cpu-dry-run.*``), rewritten after each model, so a run stopped by its time limit keeps what it
measured. Budget: each model gets an equal share of what is left of ``--budget``; an engine not
started within its model's share is listed as not run. The dry run compiles with the ``aot_eager``
back-end (graph capture on the CPU without a C++ compiler; its times mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
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
from spade_deploy.mri.coilmaps import CoilMapEstimator  # noqa: E402
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
# in the order they run: the ones that build in seconds first, the compiled ones (a minute each on the GPU) last
ENGINES = ("torch", "channels-last", "fp16", "bf16", "onnxruntime", "tensorrt", "compiled", "compiled-whole", "cuda-graph")
WARMUP = 2
DRY_MAX_ITER = 10
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
        pair = [(0.0, model.eval()), (RATIO, pruned.eval())]
        if dry_run and model.solver_cfg is not None:  # every engine's code path in minutes on a CPU: 10 iterations at most
            for _, m in pair:
                m.solver_cfg = dataclasses.replace(m.solver_cfg, max_iter=DRY_MAX_ITER)
            weights += f"; dry run: at most {DRY_MAX_ITER} iterations"
        result.append((name, weights, pair))
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


def counting_backend(backend: str, count: list[int]):
    """``backend`` (a torch.compile back-end's name) counting the graphs it compiles in ``count[0]``."""
    from torch._dynamo.backends.registry import lookup_backend

    inner = lookup_backend(backend)

    def compile_counted(gm, example_inputs):
        count[0] += 1
        return inner(gm, example_inputs)

    return compile_counted


def compiled_whole(model, backend="inductor"):
    """A copy of ``model`` with one compiled graph per iteration: a DEQ's whole fixed-point map
    (``DEQ.iteration``: data consistency and prior, a function of tensors, so every slice's
    operator of one shape reuses the graph; the solver calls it on the whole batch), a VarNet's
    whole forward pass (every cascade). ``fullgraph=True``: a graph break is an error, not a
    silent split. ``backend``: a name or a torch.compile back-end callable."""
    # Dynamo counts compilations per code object: the variants of a bench (unpruned, pruned, each
    # model size) share DEQ.iteration / VarNet.forward, so past the default limit (8) they would
    # silently run eager.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    m = copy.deepcopy(model).eval()
    if m.solver_cfg is not None:
        m.iteration = torch.compile(m.iteration, backend=backend, fullgraph=True, dynamic=False)
    else:
        m.forward = torch.compile(m.forward, backend=backend, fullgraph=True, dynamic=False)
    return m


def build_engine(engine: str, model, dev: torch.device, work: Path, size: tuple[int, int], check_input, notes: dict,
                 graphs: dict):
    """``model`` deployed on ``engine`` on ``dev``, or :class:`Absent` with the reason; what the
    table should say about it goes into ``notes[engine]``, the graphs a compiled engine compiles
    are counted in ``graphs[engine][0]``."""
    cuda = dev.type == "cuda"
    if engine == "torch":
        return placed(model, dev)
    if engine == "channels-last":
        return copy.deepcopy(model).to(dev, memory_format=torch.channels_last)
    if engine in ("compiled", "compiled-whole"):
        # the dry run checks graph capture only: aot_eager needs no C++ compiler and compiles in seconds
        count = graphs.setdefault(engine, [0])
        backend = counting_backend("inductor" if cuda else "aot_eager", count)
        if engine == "compiled":
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            return _with_priors(model, lambda p: torch.compile(p, backend=backend)).to(dev)
        return compiled_whole(model, backend).to(dev)
    if engine == "cuda-graph":
        if not cuda:
            raise Absent("absent: CUDA only")
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


# -- coil maps ---------------------------------------------------------------------------------
class CarriedMaps(CoilMapEstimator):
    """ESPIRiT maps read from a carried cache only (the device has no sigpy): a missing map is an
    error naming the command that makes it, never a recomputation."""

    def __call__(self, y, acs):
        if self._load(self.cache_dir / "espirit" / f"{self.key(y, acs)}.npy", y.shape) is None:
            raise SpadeError(f"the coil maps of a test slice are not in {self.cache_dir} (the device cannot estimate "
                             "them: no sigpy); make them with benchmarks/gpu.sh --prepare")
        return super().__call__(y, acs)


def load_test_split(data: Path, maps: Path | None) -> tuple[SliceDataset, MRITask, list]:
    """The test split, its task and every slice as the bench measures it. With ``maps`` the coil
    maps come from that cache only (checked here, before any engine runs)."""
    test = SliceDataset(data)
    if maps is not None:
        test.estimator = CarriedMaps(maps)
    task = MRITask(ACCELERATION, center_fraction_for(ACCELERATION))
    return test, task, B.bench_slices(test, task, torch.device("cpu"))


def make_maps(data: Path, maps: Path) -> int:
    """The coil maps the bench needs, estimated here by the library's cached estimator into ``maps``."""
    test = SliceDataset(data, cache_dir=maps)
    B.bench_slices(test, MRITask(ACCELERATION, center_fraction_for(ACCELERATION)), torch.device("cpu"))
    return len(test)


# -- the run -----------------------------------------------------------------------------------
def run(data: Path, out: Path, dev: torch.device, engines: list[str], budget_s: float, repeats: int, dry_run: bool,
        maps: Path | None = None) -> list[Path]:
    """Every model family on every engine; the combined results rewritten after each family."""
    t_start = time.monotonic()
    test, task, slices = load_test_split(data, maps)
    check_input = to_device(slices[0][:2], dev)
    size = tuple(slices[0][0].shape[-2:])
    device_name = B.describe_device(dev)
    suffix = "cpu-dry-run" if dry_run else "gpu"
    md_path, json_path = out / f"{suffix}.md", out / f"{suffix}.json"
    work = Path(tempfile.mkdtemp(prefix="spade-gpu-bench-"))
    header = [f"# GPU benchmark on {device_name}", "",
              f"Pruned = ratio {RATIO:g} (L1, torch-pruning), not fine-tuned. Acceleration {ACCELERATION}, test data "
              f"({len(test)} slices of {size[0]}x{size[1]}, ESPIRiT coil maps "
              f"{'made by gpu.sh --prepare and carried' if maps else 'estimated here'}). torch {torch.__version__}"
              + (f", CUDA {torch.version.cuda}, TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'}"
                 if dev.type == "cuda" else "") + f", Python {sys.version.split()[0]}."
              + (" Dry run: tiny stand-ins, compiled engines on aot_eager, times mean nothing." if dry_run else ""), ""]
    md = list(header)
    payload = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda if dev.type == "cuda" else None,
               "python": sys.version.split()[0], "budget_s": budget_s, "families": {}}
    todo = families(dry_run)
    for i, (family, weights, models) in enumerate(todo):
        t_family = time.monotonic()
        # an equal share of what is left: a slow engine of one model cannot starve the others
        deadline = t_family + (budget_s - (t_family - t_start)) / (len(todo) - i)
        status: dict[str, str] = {}
        deployed: dict[tuple[float, str], object] = {}
        graphs: dict[str, list[int]] = {}
        recon_s: dict[tuple[float, str], float] = {}
        for engine in engines:
            if time.monotonic() > deadline:
                status[engine] = "not run: this model's share of the time budget spent"
                continue
            t0 = time.monotonic()
            try:
                notes: dict[str, str] = {}
                built = {}
                for ratio, m in models:
                    built[ratio] = build_engine(engine, m, dev, work, size, check_input, notes, graphs)
                    if engine in notes:
                        notes[f"{ratio:g}"] = notes.pop(engine)
                # one reconstruction each (an engine that fails here is listed, not timed), then a timed
                # second one: what the timing rounds will cost
                for ratio, m in built.items():
                    recon_s[(ratio, engine)] = _twice(m.eval(), check_input, dev)
                deployed.update({(ratio, engine): m for ratio, m in built.items()})
                said = "; ".join(f"ratio {r}: {n}" for r, n in notes.items())
                status[engine] = f"ran (built in {time.monotonic() - t0:.1f} s{'; ' + said if said else ''})"
            except Absent as e:
                status[engine] = str(e)
            except Exception as e:  # noqa: BLE001 -- a failing engine is reported, the others still run
                status[engine] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
            print(f"{family} {engine}: {status[engine]} [{time.monotonic() - t_start:.0f} s]", flush=True)
        ran = [e for e in engines if (0.0, e) in deployed]
        ran, rounds = _fit(ran, {e: sum(recon_s[(r, e)] for r, _ in models) for e in ran}, len(test), repeats,
                           deadline - time.monotonic())
        for e in sorted({e for _, e in deployed} - set(ran), key=engines.index):
            status[e] += "; not timed: this model's share of the time budget"
        variants = [B.Variant(family, ratio, "none" if ratio else None, m) for ratio, m in models]
        by_model = {id(v.model): v.ratio for v in variants}
        # run_bench deploys each variant as backends[name](variant, sample)
        backends = {e: (lambda v, sample=None, e=e: deployed[(by_model[id(v.model)], e)]) for e in ran}
        result = None
        if "torch" in ran:
            print(f"{family}: timing {len(ran)} engines x {len(models)} models, {rounds} rounds", flush=True)
            result = B.run_bench(variants, backends, test, task, repeats=rounds, warmup=WARMUP, device=str(dev))
        for engine, (n,) in graphs.items():  # counted over building, checking and timing
            if status.get(engine, "").startswith("ran"):
                status[engine] += f"; {n} graph{'s' if n != 1 else ''} compiled for {len(models)} models"
        md += [f"## {family}", "", f"Weights: {weights}. Timed in {rounds} round{'s' if rounds != 1 else ''}"
               f"{'' if rounds == repeats else f' (of {repeats}: the time budget)'}.", ""] + _status_lines(status) + [""]
        entry = {"weights": weights, "engines": status, "rounds": rounds, "seconds": round(time.monotonic() - t_family, 1)}
        if result is not None:
            cols = B.columns(result)
            md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            md += ["| " + " | ".join(row) + " |" for row in B.table_rows(result)]
            entry.update(result.as_dict())
        else:
            md += ["No table: the eager FP32 reference did not run."]
        md += [""]
        payload["families"][family] = entry
        payload["seconds"] = round(time.monotonic() - t_start, 1)
        write_text(md_path, "\n".join(md) + "\n")
        write_json(json_path, payload)
        print(f"{family}: {time.monotonic() - t_start:.0f} s elapsed", flush=True)
    return [md_path, json_path]


def _twice(model, inputs, dev: torch.device) -> float:
    """Seconds of the second of two reconstructions of ``inputs`` (the first compiles, warms up)."""
    with torch.no_grad():
        model(*inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        model(*inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def _fit(ran: list[str], seconds: dict[str, float], n_slices: int, repeats: int, left: float) -> tuple[list[str], int]:
    """The engines to time and the rounds, so that the timing (``seconds[e]``: one reconstruction
    of every model on engine ``e``; warm-up and ``rounds`` x ``n_slices`` each) fits in ``left``:
    fewer rounds first (down to 1), then the slowest engines left out; eager ``torch``, the
    reference, is always timed."""
    keep, rounds = list(ran), repeats

    def cost() -> float:
        return sum(seconds[e] for e in keep) * (WARMUP + n_slices * rounds)

    while rounds > 1 and cost() > left:
        rounds -= 1
    while cost() > left and any(e != "torch" for e in keep):
        keep.remove(max((e for e in keep if e != "torch"), key=seconds.get))
    return keep, rounds


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
    ap.add_argument("--maps", type=Path, metavar="CACHE",
                    help="coil-map cache (--make-maps' output): maps are read from it only, a missing one is an error")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds; each model gets an equal share of what is left, engines not started in it are listed as not run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cpu-dry-run", action="store_true", help="CPU, tiny paper-size stand-ins: checks every code path but CUDA")
    ap.add_argument("--make-data", type=Path, metavar="DIR")
    ap.add_argument("--make-maps", action="store_true", help="estimate the coil maps of --data into --maps (needs sigpy)")
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
        if args.make_maps:
            if args.maps is None:
                raise SpadeError("--make-maps needs --maps CACHE")
            print(f"coil maps of {make_maps(args.data, args.maps)} slices in {args.maps}")
            return
        dev = require_device("cpu" if args.cpu_dry_run else "cuda")
        paths = run(args.data, args.out, dev, args.engines, args.budget, args.repeats, args.cpu_dry_run, args.maps)
        print("results: " + ", ".join(str(p) for p in paths))
    except SpadeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
