"""The fastest engine for each prior, chosen by measurement on the run device at the data's shape.

Candidates: PyTorch eager in channels-last (``torch``), ``torch.compile`` with inductor
(``torch-compile``), onnxruntime with all graph optimisations (``onnxruntime``, from the export
manifest) and, on CUDA, a CUDA graph of the eager prior (``cuda-graph``) and the manifest's
TensorRT engine (``tensorrt``). An engine that is absent here is recorded as ``unavailable``, one
that fails to build or run as ``failed``, one whose output differs from PyTorch's by more than
``1e-4`` (``max|out - ref| / max|ref|``, FP32) as ``inaccurate``; none of them can win.

Each candidate is timed twice, in interleaved rounds (round ``r`` runs every engine once, the
order rotated per round, so drift hits them alike; the median is kept):

* ``prior_ms``: one call of the prior alone;
* ``loop_ms``: one whole outer iteration of the reconstructor (data consistency + every prior +
  the solver's step) with every prior swapped for that engine. A prior faster alone can be slower
  inside the loop (onnxruntime's thread pool against torch's between calls): where the loop is
  measured it decides.

Precision is a dimension of the choice too. For a fixed-point model, on a device that computes a
low precision natively (:func:`~spade_deploy.deploy.priors.low_precision_support`: bf16 on CPUs
with AMX-BF16 / AVX512-BF16; fp16, and bf16 where supported, on CUDA), the winner's FP32 priors are
paired with a low-precision copy under a precision schedule (:class:`~spade_deploy.solvers.PrecisionSchedule`:
low precision until the switch residual of :data:`SWITCH_RESIDUAL`, FP32 to the tolerance) and
whole solves of the sample are timed against the FP32 deployment, interleaved: the schedule changes
the iteration count, not only the cost of one. It is chosen only where every sample converges at
the FP32 tolerance and its median solve is at least :data:`MIN_GAIN` faster; a precision that
slows this device down is never chosen. Unrolled models stay FP32 here: low precision changes
their output, which only a quality check on a validation split can accept
(:func:`spade_deploy.deploy.runtime.check_unrolled_precision`).

The setup an engine costs in every new process (compilation, session creation) is spread over
``amortise_calls`` prior calls and added to its time, so ``torch.compile`` wins only where its
gain pays for its compilation. The winner and every timing are written into the export manifest,
under ``engine_choice`` of each prior, one record per device and shape; ``deploy(model, "auto",
manifest)`` reads it back (see :func:`deploy_auto`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import datetime as _dt
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..errors import SpadeError
from ..io import write_json
from ..lazy import optional
from ..models import Reconstructor, layer_shapes
from ..solvers import MIN_TOL, PrecisionSchedule, SolverConfig
from ..tasks import task_for
from ..timing import interleaved_medians, sync_device
from .export import read_export_manifest
from .priors import (CastPrior, ChannelsLastPrior, CudaGraphPrior, OrtPrior, PrecisionPrior, TrtPrior, cpu_isa,
                     low_precision_support)

# The candidates ``auto`` tries: all, or those named in $SPADE_AUTO_ENGINES (comma-separated), e.g.
# to leave out torch.compile where its compilation time is not worth measuring.
ENV_ENGINES = "SPADE_AUTO_ENGINES"
TOLERANCE = 1e-4  # FP32 engines must reproduce PyTorch's prior within this relative error
RECORD_KEY = "engine_choice"
# Where a sample hands over from low precision to FP32 (relative fixed-point residual). bf16: the
# shipped small DEQ's bf16-prior residual floors at 1.1e-3 to 1.5e-3 (check_precision on its test
# slices); of the switch points 1e-2, 5e-3, 3e-3, 2e-3 timed on its test split
# (benchmarks/precision.py), 5e-3 (about 4 times that floor) solved fastest: later switches spend
# many bf16 iterations creeping along the floor, earlier ones leave FP32 most of the work. fp16's
# round-off is 8 times finer (2^-11 against 2^-8): the same multiple of its floor.
SWITCH_RESIDUAL = {"bf16": 5e-3, "fp16": 6e-4}
MIN_GAIN = 0.97  # a schedule is chosen only where its median solve takes under 97 % of the FP32 one


class EngineUnavailable(Exception):
    """The engine cannot run here (not installed, no GPU, not exported): skipped, not an error."""


@dataclass
class EngineTiming:
    status: str = "ok"  # ok | unavailable | failed | inaccurate
    prior_ms: float | None = None  # median ms of one prior call
    loop_ms: float | None = None  # median ms of one outer iteration with this engine in the loop
    max_rel_error: float | None = None
    setup_s: float | None = None  # building the engine and its first call (compilation)
    note: str = ""


# ------------------------------------------------------------------------------------------------
# The engines: one registry, name -> how to build the module that runs a prior on it
# ------------------------------------------------------------------------------------------------
EngineBuilder = Callable[[nn.Module, str, "dict | None", "dict | None", "Path | None"], nn.Module]


@dataclass(frozen=True)
class Engine:
    """One way to run a prior. ``build(prior, device, manifest, entry, root)`` returns the module
    that runs ``prior`` on ``device`` (``entry``: the prior's record in the export manifest
    ``manifest`` of folder ``root``: its ONNX file, TensorRT engine), or raises
    :class:`EngineUnavailable` where it cannot run here. ``backend``: a user may also name it as a
    back-end (``--backend``) and deploy on it without measurement."""

    name: str
    build: EngineBuilder
    backend: bool = False
    label: str = ""  # what a table shows: eager NCHW, channels-last, torch.compile, onnxruntime, ...
    precision: str = "fp32"  # what it computes in; auto's engine candidates are the fp32 ones


# In registration order: the order ``auto`` measures them in and names them in messages.
ENGINES: dict[str, Engine] = {}


def register_engine(name: str, backend: bool = False, label: str = "", precision: str = "fp32"
                    ) -> Callable[[EngineBuilder], EngineBuilder]:
    """Register an engine's builder under ``name`` (a decorator)."""
    def deco(build: EngineBuilder) -> EngineBuilder:
        ENGINES[name] = Engine(name, build, backend, label or name, precision)
        return build

    return deco


def backend_names() -> tuple[str, ...]:
    """The back-ends a user may name: ``auto`` (measured) and the engines registered as back-ends."""
    return ("auto", *(n for n, e in ENGINES.items() if e.backend))


@register_engine("torch", backend=True, label="channels-last")
def _torch(prior: nn.Module, device: str, manifest=None, entry=None, root=None) -> nn.Module:
    return ChannelsLastPrior(prior).to(device)


@register_engine("torch-compile", label="torch.compile")
def _torch_compile(prior: nn.Module, device: str, manifest=None, entry=None, root=None) -> nn.Module:
    # Shapes start static; a second batch size (the solver's shrinking active set) or image
    # size recompiles once with that dimension dynamic instead of once per size. Dynamo counts
    # compilations per code object, not per module: every prior of one class shares its
    # ``forward``, and past the limit (8) each further variant of a bench or demo would
    # silently run eager, so the limit is raised. The input goes channels-last outside the
    # compiled code, which sees one memory layout only.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    module = ChannelsLastPrior(prior).to(device)
    with warnings.catch_warnings():  # inductor's first import warns of torch's own torch.jit use
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script_method", category=DeprecationWarning)
        module.prior = torch.compile(module.prior, backend="inductor")
    return module


@register_engine("onnxruntime", backend=True, label="onnxruntime")
def _onnxruntime(prior: nn.Module, device: str, manifest=None, entry=None, root=None) -> nn.Module:
    if entry is None or not entry.get("onnx"):
        raise EngineUnavailable("no exported ONNX prior (spade export)")
    if torch.device(device).type == "cuda" and "CUDAExecutionProvider" not in optional("onnxruntime").get_available_providers():
        raise EngineUnavailable("onnxruntime has no CUDA provider here")
    return OrtPrior(Path(root) / entry["onnx"], device, manifest["input"], manifest["output"])


@register_engine("cuda-graph", label="CUDA graph")
def _cuda_graph(prior: nn.Module, device: str, manifest=None, entry=None, root=None) -> nn.Module:
    if torch.device(device).type != "cuda":
        raise EngineUnavailable("CUDA graphs need a CUDA device")
    return CudaGraphPrior(ChannelsLastPrior(prior).to(device))


@register_engine("tensorrt", backend=True, label="TensorRT")
def _tensorrt(prior: nn.Module, device: str, manifest=None, entry=None, root=None) -> nn.Module:
    if torch.device(device).type != "cuda":
        raise EngineUnavailable("TensorRT needs a CUDA device")
    try:
        optional("tensorrt")
    except SpadeError:
        raise EngineUnavailable("TensorRT is not installed") from None
    if entry is None or not entry.get("engine"):
        raise EngineUnavailable("no TensorRT engine in the export manifest (spade export --trt)")
    return TrtPrior(Path(root) / entry["engine"], manifest["input"], manifest["output"])


def _low(precision: str) -> EngineBuilder:
    def build(prior: nn.Module, device: str, manifest=None, entry=None, root=None) -> nn.Module:
        return CastPrior(prior, precision).to(device)
    return build


# The low-precision half of a precision schedule (the eager prior, channels-last, cast).
for _p in ("bf16", "fp16"):
    register_engine(f"torch-{_p}", label=f"channels-last {_p}", precision=_p)(_low(_p))


def engine_label(name: str, precision: str = "fp32") -> str:
    """What ran, for a table: the engine's label and the precision (a schedule shown as ``bf16->fp32``)."""
    return f"{ENGINES[name].label if name in ENGINES else name} {precision.split(' @ ')[0]}"


def build_engine(name: str, prior: nn.Module, device: str, manifest: dict | None = None,
                 entry: dict | None = None, root: Path | None = None) -> nn.Module:
    """The module that runs ``prior`` on engine ``name`` (:data:`ENGINES`); :class:`EngineUnavailable`
    when it cannot run here. ``entry``: the prior's record in the export manifest (ONNX file,
    TensorRT engine)."""
    if name not in ENGINES:
        raise SpadeError(f"unknown engine {name!r}; choose from {', '.join(ENGINES)}")
    return ENGINES[name].build(prior, device, manifest, entry, root)


# ------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------
def candidate_engines() -> tuple[str, ...]:
    """The engines ``auto`` measures: every one of :data:`ENGINES`, or those named in ``$SPADE_AUTO_ENGINES``."""
    names = [n.strip() for n in os.environ.get(ENV_ENGINES, "").split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise SpadeError(f"${ENV_ENGINES} names unknown engines {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    return tuple(names) or tuple(n for n, e in ENGINES.items() if e.precision == "fp32")


def describe_device(device: str | torch.device) -> str:
    """The run device as recorded with a measurement (a CPU's thread count changes its timings)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    import platform

    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def max_relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().float().cpu(), out.detach().float().cpu()
    if ref.shape != out.shape:
        return float("inf")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@dataclass
class Selection:
    """One measurement: what :func:`select_engines` records for every prior."""

    device: str
    device_type: str
    data_shape: list[int]  # (coils, H, W) of the measurements timed in the loop
    winner: str
    decided_by: str  # "loop" (whole iterations) or "prior" (the prior alone)
    priors: dict[str, dict]  # name -> {"shape": [...], "engines": {engine: EngineTiming as dict}}
    amortise_calls: int
    loop_iterations: int
    rounds: int
    modules: dict = field(default_factory=dict, repr=False)  # engine -> {prior: module}, reused by deploy_auto
    # Timed on this model, or on another of the same architecture earlier in this process (speed
    # depends on the layer widths, not on the weights; the winner is checked on these weights).
    timed_on: str = "this model"
    precision: str = "fp32"  # the precision schedule chosen (PrecisionSchedule.label) or "fp32"
    schedule: dict | None = None  # its fields (PrecisionSchedule), None for fp32
    # label -> whole solves of the sample: status, solve_ms, iterations, low_precision_iterations, note
    precision_trials: dict = field(default_factory=dict)
    isa: str = ""  # the instruction set (CPU) or GPU the precisions were measured on
    precision_note: str = ""

    def record(self, prior: str) -> dict:
        p = self.priors[prior]
        return {"device": self.device, "device_type": self.device_type, "shape": p["shape"],
                "data_shape": self.data_shape, "winner": self.winner, "decided_by": self.decided_by,
                "tolerance": TOLERANCE, "amortise_calls": self.amortise_calls,
                "loop_iterations": self.loop_iterations, "rounds": self.rounds,
                "timings_ms": {e: t["prior_ms"] for e, t in p["engines"].items()},
                "loop_timings_ms": {e: t["loop_ms"] for e, t in p["engines"].items()},
                "max_rel_error": {e: t["max_rel_error"] for e, t in p["engines"].items()},
                "engines": p["engines"], "timed_on": self.timed_on,
                "precision": self.precision, "schedule": self.schedule, "precision_trials": self.precision_trials,
                "isa": self.isa, "precision_note": self.precision_note,
                "engine_label": engine_label(self.winner, self.precision),
                "measured_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


@contextlib.contextmanager
def _strict_fp32(device: torch.device):
    """FP32 arithmetic for PyTorch on CUDA while engines are checked and timed: TF32 convolutions
    (PyTorch's default for cuDNN) differ from FP32 by ~1e-3, beyond the 1e-4 the check allows."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def select_engines(
    model: Reconstructor,
    sample: tuple[torch.Tensor, object],
    manifest: dict | None = None,
    root: Path | None = None,
    device: str = "cpu",
    engines: Sequence[str] | None = None,
    rounds: int = 7,
    loop_iterations: int = 3,
    measure_loop: bool = True,
    amortise_calls: int = 1000,
    timer: Callable[[], float] = time.perf_counter,
    builder: Callable[..., nn.Module] = build_engine,
    precisions: Sequence[str] | None = None,
    solve_rounds: int = 3,
) -> Selection:
    """Build, check and time every engine of ``engines`` for every prior of ``model`` on
    ``sample = (y, physics)`` (one slice of the data, or the task's :meth:`~spade_deploy.tasks.Task.synthetic_sample`).

    The winner is the accurate engine of least ``time + setup / amortise_calls``, time being the
    whole-iteration time where ``measure_loop`` else the prior's. One engine for every prior: the
    loop swaps them all at once.

    Fixed-point models: the low precisions of ``precisions`` (None: those this device computes
    natively) are then tried as precision schedules over the winner (module docstring), timed by
    ``solve_rounds`` interleaved whole solves of the sample.
    """
    with torch.no_grad(), _strict_fp32(torch.device(device)):
        sel = _select(model, sample, manifest, root, device, engines, rounds, loop_iterations, measure_loop,
                      amortise_calls, timer, builder)
        _choose_precision(sel, model, sample, device, precisions, solve_rounds, timer, builder, manifest, root)
        return sel


def _deployed(model: Reconstructor, modules: dict[str, nn.Module]) -> Reconstructor:
    """A copy of ``model`` with its priors replaced by ``modules`` (shared, not copied)."""
    m = copy.deepcopy(model)
    for name, module in modules.items():
        m.set_prior(name, module)
    return m.eval()


def _with_schedule(model: Reconstructor, full: dict[str, nn.Module], low: dict[str, nn.Module],
                   schedule: PrecisionSchedule) -> Reconstructor:
    """A copy of ``model`` whose priors run ``low`` in a schedule's low phase, ``full`` otherwise."""
    m = _deployed(model, {n: PrecisionPrior(full[n], low[n], schedule.low) for n in full})
    m.precision_schedule = schedule
    return m


def _choose_precision(sel: Selection, model, sample, device, precisions, solve_rounds, timer, builder, manifest,
                      root) -> None:
    """Try precision schedules over ``sel``'s winner and record the trials (module docstring)."""
    dev = torch.device(device)
    native = low_precision_support(dev)
    sel.isa = cpu_isa() if dev.type == "cpu" else torch.cuda.get_device_name(dev)
    if model.solver_cfg is None:
        sel.precision_note = ("fp32: an unrolled model takes low precision only after a quality check on a validation "
                              "split (check_unrolled_precision)")
        return
    lows = list(native) if precisions is None else [p for p in precisions if p != "fp32"]
    if not lows:
        sel.precision_note = ("fp32 only: no low precision is computed natively here" if precisions is None
                              else "fp32 only, as asked")
        return
    full = sel.modules[sel.winner]
    if len(full) != len(model.priors()):
        sel.precision_note = "fp32: the winner's modules are not at hand"
        return
    y, physics = sample
    y, physics = y.to(dev), physics.to(dev)
    entries = {e["name"]: e for e in (manifest or {}).get("priors", [])}
    nets: dict[str, Reconstructor] = {"fp32": _deployed(model, full)}
    trials: dict[str, dict] = {}
    schedules: dict[str, PrecisionSchedule] = {}
    for low in lows:
        sched = PrecisionSchedule(low, SWITCH_RESIDUAL[low])
        trial = trials[sched.label] = {"status": "ok", "solve_ms": None, "note": ""}
        if low not in native:
            trial["note"] = f"{low} is not native here (emulated)"
        try:
            lowmods = {n: builder(f"torch-{low}", p.eval(), device, manifest, entries.get(n), root)
                       for n, p in model.priors().items()}
        except EngineUnavailable as exc:
            trial.update(status="unavailable", note=str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - recorded, not fatal
            trial.update(status="failed", note=_first_line(exc))
            continue
        nets[sched.label] = _with_schedule(model, full, lowmods, sched)
        schedules[sched.label] = sched
    trials = {"fp32": {"status": "ok", "solve_ms": None, "note": ""}, **trials}
    for label, net in list(nets.items()):  # warm-up, and the FP32 tolerance checked on every sample
        try:
            net(y, physics)
            sync_device(dev)
        except Exception as exc:  # noqa: BLE001
            trials[label].update(status="failed", note=_first_line(exc))
            del nets[label]
            continue
        info = net.solve_info()
        if label == "fp32" and not bool(info.converged.all()):  # nothing a schedule could finish faster
            trials["fp32"].update(status="no-convergence", iterations=info.iterations.float().mean().item())
            sel.precision_trials = {"fp32": trials["fp32"]}
            sel.precision_note = "fp32: the FP32 solve of the sample stops on its cap; no precision schedule tried"
            return
        trials[label].update(iterations=info.iterations.float().mean().item(),
                             low_precision_iterations=(info.low_precision_iterations.float().mean().item()
                                                       if info.low_precision_iterations is not None else 0.0),
                             max_residual=float(info.residual.max()))
        if not bool(info.converged.all()) and label != "fp32":
            trials[label].update(status="no-convergence",
                                 note=f"residual {float(info.residual.max()):.1e} above the FP32 tol {model.solver_cfg.tol:g}")
            del nets[label]
    sec = interleaved_medians({k: (lambda m=m: m(y, physics)) for k, m in nets.items()}, solve_rounds,
                              sync=lambda: sync_device(dev), timer=timer, rotate=True)
    for label, s in sec.items():
        trials[label]["solve_ms"] = 1000 * s
    sel.precision_trials = trials
    fp32_ms = trials["fp32"]["solve_ms"]
    best = min((k for k in sec if k != "fp32"), key=sec.get, default=None)
    if best is None:
        sel.precision_note = "fp32: no precision schedule converged at the FP32 tolerance"
    elif not 1000 * sec[best] < MIN_GAIN * fp32_ms:
        trials[best]["note"] = (trials[best]["note"] + "; " if trials[best]["note"] else "") + \
            f"not faster here ({1000 * sec[best]:.1f} ms against {fp32_ms:.1f} ms per solve in fp32)"
        sel.precision_note = f"fp32: no precision schedule is at least {100 * (1 - MIN_GAIN):.0f} % faster here"
    else:
        sched = schedules[best]
        sel.precision, sel.schedule = sched.label, dataclasses.asdict(sched)
        sel.precision_note = (f"{best}: x{fp32_ms / (1000 * sec[best]):.2f} per solve against fp32, every sample "
                              f"converged at the FP32 tol")
        lowmods = {n: m.low for n, m in nets[best].priors().items()}
        sel.modules = {**sel.modules, f"torch-{sched.low}": lowmods}


def _select(model, sample, manifest, root, device, engines, rounds, loop_iterations, measure_loop, amortise_calls,
            timer, builder) -> Selection:
    dev = torch.device(device)
    engines = tuple(engines) if engines is not None else candidate_engines()
    model = model.to(dev).eval()
    y, physics = sample
    y, physics = y.to(dev), physics.to(dev)
    h, w = y.shape[-2:]
    entries = {e["name"]: e for e in (manifest or {}).get("priors", [])}
    timings: dict[str, dict[str, EngineTiming]] = {}
    modules: dict[str, dict[str, nn.Module]] = {e: {} for e in engines}
    shapes: dict[str, list[int]] = {}
    for name, prior in model.priors().items():
        prior = prior.eval()
        x = model.prior_example_input(name, h, w).to(dev)
        shapes[name] = list(x.shape)
        ref = prior(x)
        timings[name] = {}
        for eng in engines:
            t = timings[name][eng] = EngineTiming()
            try:
                t0 = timer()
                module = builder(eng, prior, device, manifest, entries.get(name), root)
                out = module(x)  # the first call: compilation, session warm-up
                sync_device(dev)
                t.setup_s = timer() - t0
            except EngineUnavailable as exc:
                t.status, t.note = "unavailable", str(exc)
                continue
            except Exception as exc:  # an engine that cannot build or run is recorded, not fatal
                t.status, t.note = "failed", _first_line(exc)
                continue
            t.max_rel_error = max_relative_error(ref, out)
            if not t.max_rel_error <= TOLERANCE:
                t.status, t.note = "inaccurate", f"max relative error {t.max_rel_error:.1e} > {TOLERANCE:g}"
                continue
            modules[eng][name] = module
        ok = {e: modules[e][name] for e in engines if name in modules[e]}
        for eng, sec in interleaved_medians({e: (lambda m=m: m(x)) for e, m in ok.items()}, rounds, sync=lambda: sync_device(dev),
                                            timer=timer, rotate=True).items():
            timings[name][eng].prior_ms = 1000 * sec
    # Engines that run every prior can run the loop.
    usable = [e for e in engines if len(modules[e]) == len(timings)]
    loop_ms: dict[str, float] = {}
    if measure_loop and usable:
        solver_kw = {}
        if model.solver_cfg is not None:
            # The smallest tolerance allowed, which no float32 iterate meets: exactly ``loop_iterations`` iterations per call.
            solver_kw["solver"] = SolverConfig(method=model.solver_cfg.method, max_iter=loop_iterations, tol=MIN_TOL,
                                               anderson_m=model.solver_cfg.anderson_m)
        swapped = {}
        for eng in usable:
            m = copy.deepcopy(model)
            for name, module in modules[eng].items():
                m.set_prior(name, module)
            swapped[eng] = m.eval()
        iters = {}
        for eng, m in list(swapped.items()):
            try:
                m(y, physics, **solver_kw)  # warm-up
                sync_device(dev)
            except Exception as exc:  # runs a prior alone but not inside the loop: recorded, not chosen
                for name in timings:
                    timings[name][eng].status, timings[name][eng].note = "failed", "in the loop: " + _first_line(exc)
                del swapped[eng]
                usable.remove(eng)
                continue
            info = m.solve_info()
            iters[eng] = float(info.iterations.max()) if info is not None else 1.0
        sec = interleaved_medians({e: (lambda m=m: m(y, physics, **solver_kw)) for e, m in swapped.items()}, rounds,
                                  sync=lambda: sync_device(dev), timer=timer, rotate=True)
        loop_ms = {e: 1000 * s / iters[e] for e, s in sec.items()}
        for name in timings:
            for eng, ms in loop_ms.items():
                timings[name][eng].loop_ms = ms
    if not usable:
        raise SpadeError("no engine runs every prior of this model here: " + "; ".join(
            f"{e}: {timings[n][e].note}" for n in timings for e in engines if timings[n][e].note)[:500])

    def cost(eng: str) -> float:  # ms per call, the setup of every prior spread over amortise_calls calls
        setup_ms = 1000 * sum(timings[n][eng].setup_s or 0.0 for n in timings)
        return run_ms(eng) + setup_ms / max(amortise_calls, 1)

    def run_ms(eng: str) -> float:
        return loop_ms[eng] if loop_ms else sum(timings[n][eng].prior_ms for n in timings)

    winner = min(usable, key=cost)
    for eng in usable:  # say why a faster-running engine lost
        if eng != winner and run_ms(eng) < run_ms(winner):
            for n in timings:
                timings[n][eng].note = (f"faster per call, but its setup ({timings[n][eng].setup_s:.1f} s) costs more "
                                        f"than it gains over {amortise_calls} calls")
    return Selection(
        device=describe_device(dev), device_type=dev.type, data_shape=list(y.shape[1:]), winner=winner,
        decided_by="loop" if loop_ms else "prior",
        priors={n: {"shape": shapes[n], "engines": {e: asdict(t) for e, t in timings[n].items()}} for n in timings},
        amortise_calls=amortise_calls, loop_iterations=loop_iterations, rounds=rounds, modules=modules,
    )


# ------------------------------------------------------------------------------------------------
# The manifest record and deployment
# ------------------------------------------------------------------------------------------------
def recorded_choice(manifest: dict, prior: str, device: str | torch.device, shape: Sequence[int]) -> dict | None:
    """The record of ``prior`` measured on this device at this prior input shape, if any."""
    desc = describe_device(device)
    for entry in manifest.get("priors", []):
        if entry.get("name") == prior:
            for rec in entry.get(RECORD_KEY) or []:
                if rec.get("device") == desc and list(rec.get("shape", [])) == list(shape) and rec.get("winner") in ENGINES:
                    return rec
    return None


def record_selection(manifest_path: str | Path, selection: Selection) -> dict:
    """Write ``selection`` into the export manifest (replacing a record of the same device and shape)."""
    manifest = read_export_manifest(manifest_path)
    for entry in manifest.get("priors", []):
        if entry.get("name") not in selection.priors:
            continue
        rec = selection.record(entry["name"])
        kept = [r for r in entry.get(RECORD_KEY) or []
                if not (r.get("device") == rec["device"] and r.get("shape") == rec["shape"])]
        entry[RECORD_KEY] = kept + [rec]
    write_json(manifest_path, manifest)
    return manifest


# Selections made in this process, by architecture, device, shape and candidates: a bench of three
# fine-tuning strategies per pruning ratio times each architecture once.
_TIMED: dict[tuple, Selection] = {}


def _architecture_key(model: Reconstructor, device, shape, engines) -> tuple:
    arch = json.dumps({n: layer_shapes(p) for n, p in model.priors().items()}, sort_keys=True)
    cands = tuple(engines) if engines is not None else candidate_engines()
    return model.registry_name, arch, describe_device(device), tuple(shape), cands


@torch.no_grad()
def _reuse(selection: Selection | None, model: Reconstructor, shape, device, manifest, root,
           builder: Callable[..., nn.Module] = build_engine) -> Selection | None:
    """``selection``'s timings for ``model`` (same architecture), its winner built and checked on
    this model's weights; None where there is none or the winner is inaccurate here."""
    if selection is None:
        return None
    entries = {e["name"]: e for e in (manifest or {}).get("priors", [])}
    priors, modules = copy.deepcopy(selection.priors), {}
    with _strict_fp32(torch.device(device)):
        for name, prior in model.priors().items():
            prior = prior.to(device).eval()
            x = model.prior_example_input(name, *shape).to(device)
            try:
                module = builder(selection.winner, prior, device, manifest, entries.get(name), root)
                err = max_relative_error(prior(x), module(x))
            except Exception:
                return None
            if not err <= TOLERANCE:
                return None
            modules[name] = module
            priors[name]["engines"][selection.winner]["max_rel_error"] = err
    # The engine's speed is the architecture's; a precision schedule's gain is not (it depends on
    # the iteration counts, hence on the weights): deploy_auto decides the precision again.
    return dataclasses.replace(selection, priors=priors, modules={selection.winner: modules},
                               timed_on="an identical architecture earlier in this run", precision="fp32",
                               schedule=None, precision_trials={}, precision_note="")


def deploy_auto(
    model: Reconstructor,
    manifest_path: str | Path | None,
    device: str = "cpu",
    shape: tuple[int, int] | None = None,
    sample: tuple[torch.Tensor, object] | None = None,
    remeasure: bool = False,
    precision: str = "auto",
    **measure,
) -> Reconstructor:
    """A copy of ``model`` whose priors run on the engine recorded as fastest for this device and
    this data shape (``shape`` = image H, W, or that of ``sample``); measured and recorded first
    when the manifest holds no such record. ``deployed.engine_choice`` names each prior's engine,
    ``deployed.precision`` the precision schedule and ``deployed.engine_label`` both.

    ``precision``: ``auto`` (the recorded choice), ``fp32``, or a low precision to run as a
    schedule whatever its measured speed (:func:`apply_precision`)."""
    if sample is None and shape is None:
        raise SpadeError("the auto back-end needs the data's image size to choose an engine for it")
    if sample is not None:
        shape = tuple(sample[0].shape[-2:])
    manifest = read_export_manifest(manifest_path) if manifest_path is not None else None
    if manifest is not None and manifest.get("model") != model.registry_name:
        raise SpadeError(f"{manifest_path} was exported from a {manifest.get('model')!r}, not a {model.registry_name!r}")
    root = Path(manifest_path).parent if manifest_path is not None else None
    shapes = {n: list(model.prior_example_input(n, *shape).shape) for n in model.priors()}
    records = {n: recorded_choice(manifest, n, device, s) for n, s in shapes.items()} if manifest else {}
    if remeasure or not manifest or not all(records.values()):
        key = _architecture_key(model, device, shape, measure.get("engines"))
        if sample is None:  # measurements of the model's task at the data's size
            sample = task_for(model).synthetic_sample(*shape, device=device)
        builder = measure.get("builder", build_engine)
        selection = None if remeasure else _reuse(_TIMED.get(key), model, shape, device, manifest, root, builder)
        if selection is None:
            selection = _TIMED[key] = select_engines(model, sample, manifest, root, device, **measure)
        else:  # the engine timed on the same widths; the precision decided on these weights
            with torch.no_grad(), _strict_fp32(torch.device(device)):
                _choose_precision(selection, model, sample, device, measure.get("precisions"),
                                  measure.get("solve_rounds", 3), measure.get("timer", time.perf_counter),
                                  builder, manifest, root)
        if manifest_path is not None:
            manifest = record_selection(manifest_path, selection)
        records = {n: selection.record(n) for n in shapes}
        built = selection.modules
    else:
        built = {}
    entries = {e["name"]: e for e in (manifest or {}).get("priors", [])}
    deployed = copy.deepcopy(model).to(device).eval()
    choice = {}
    for name, prior in model.priors().items():
        winner = records[name]["winner"]
        try:
            module = built.get(winner, {}).get(name)  # never truth-tested: a compiled module has no len()
            if module is None:
                module = build_engine(winner, prior.eval(), device, manifest, entries.get(name), root)
        except EngineUnavailable as exc:
            raise SpadeError(f"the engine recorded for {name!r} ({winner}) cannot run here: {exc}") from None
        deployed.set_prior(name, module)
        choice[name] = winner
    deployed.engine_choice = choice
    rec = records[next(iter(shapes))]
    if precision == "auto" and rec.get("schedule"):
        lows = {n: built.get(f"torch-{rec['schedule']['low']}", {}).get(n) for n in shapes}
        apply_precision(deployed, model, PrecisionSchedule(**rec["schedule"]), device, lows)
    elif precision not in ("auto", "fp32"):
        apply_precision(deployed, model, precision, device)
    deployed.engine_label = engine_label(rec["winner"], deployed.precision)
    return deployed


def precision_schedule(precision: str | PrecisionSchedule) -> PrecisionSchedule:
    """``bf16`` / ``fp16`` as the schedule of its :data:`SWITCH_RESIDUAL`, or the schedule itself."""
    if isinstance(precision, PrecisionSchedule):
        return precision
    if precision not in SWITCH_RESIDUAL:
        raise SpadeError(f"unknown precision {precision!r} (auto | fp32 | {' | '.join(SWITCH_RESIDUAL)})")
    return PrecisionSchedule(precision, SWITCH_RESIDUAL[precision])


def apply_precision(deployed: Reconstructor, model: Reconstructor, precision: str | PrecisionSchedule,
                    device: str = "cpu", lows: dict | None = None) -> Reconstructor:
    """Run ``deployed``'s solves (a deployment of the fixed-point ``model``, in place) as a precision
    schedule: each prior paired with a low-precision copy of ``model``'s (``lows``: built already).
    Sets ``deployed.precision``."""
    sched = precision_schedule(precision)
    if model.solver_cfg is None:
        raise SpadeError(f"{model.registry_name} is an unrolled model: low precision changes its output, and is taken "
                         "only after a quality check on a validation split (check_unrolled_precision)")
    for name, prior in model.priors().items():
        low = (lows or {}).get(name)
        if low is None:
            low = build_engine(f"torch-{sched.low}", prior.eval(), device)
        deployed.set_prior(name, PrecisionPrior(deployed.priors()[name], low, sched.low))
    deployed.precision_schedule = sched
    deployed.precision = sched.label
    return deployed


__all__ = ["ENGINES", "TOLERANCE", "RECORD_KEY", "EngineTiming", "EngineUnavailable", "Selection", "build_engine",
           "select_engines", "record_selection", "recorded_choice", "deploy_auto", "register_engine", "backend_names", "Engine",
           "describe_device", "ChannelsLastPrior", "CudaGraphPrior", "engine_label", "apply_precision",
           "precision_schedule", "SWITCH_RESIDUAL", "MIN_GAIN"]
