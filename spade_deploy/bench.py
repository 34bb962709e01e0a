"""Benchmark: quality and latency of unpruned and pruned reconstructors on every back-end.

Every variant runs the same reconstructor loop under the same stopping rule (tolerance and
iteration cap). Timing covers every test slice, not one, in interleaved rounds: round ``r``
reconstructs every slice once with every variant, the variants' order rotated by ``r``, so drift
on the machine hits all of them alike. A variant's latency is the **mean over slices of each
slice's median over rounds** (the expected time to reconstruct one test slice), device-
synchronised (CUDA events on a GPU). Its time per outer iteration is the sum of those medians over
the sum of the slices' iterations (models without a fixed-point solver: one pass = one iteration).

Speed-ups are ratios measured in the same run against the unpruned model of the same architecture:
run in PyTorch (pruning + deployment: the whole reconstruction and per iteration), and run on the
same back-end (pruning alone). Efficiency is the per-iteration speed-up divided by the fall of the
priors' MACs: 1 where latency falls as fast as the arithmetic. Where no reference was measured a
speed-up is ``None`` (shown "–"). A variant's first round is its evaluation (one slice per call),
so its scores are those of reconstructions it was timed on. A variant marked untimed
(``Variant.timed``: the demo's pruned models before fine-tuning) is scored, with its iterations,
and left out of the timing rounds.

Every row says what ran: ``engine`` (eager NCHW, channels-last, torch.compile, onnxruntime,
TensorRT, CUDA graph: the deployment's own label where it sets one), ``precision`` (fp32, or a
precision schedule), and ``deployed_widths`` where the deployment padded a pruned prior with zero
filters to widths this device runs faster (:mod:`spade_deploy.deploy.widths`, e.g. ``19->32``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .device import on_model_device, placed
from .hostmem import allocator_state
from .timing import sync_device
from .io import atomic_path, write_json, write_text
from .models import Reconstructor, count_parameters
from .prune import count_macs
from .solvers import SolverConfig
from .deploy.engines import describe_device
from .tasks import Task
from .train import evaluate

AGGREGATION = "latency: median over rounds per slice, then mean over slices"


@dataclass
class Variant:
    """One model to benchmark: the unpruned model (ratio 0, strategy None) or a fine-tuned pruned one.
    ``widths``: how the pruned widths were chosen (``paper`` = the ratio exactly; None unpruned)."""

    label: str
    ratio: float
    strategy: str | None
    model: Reconstructor
    widths: str | None = None
    timed: bool = True  # False: scored only (the demo's pruned models before fine-tuning)


@dataclass
class BenchRow:
    label: str
    ratio: float
    strategy: str | None
    backend: str
    params: int
    macs: int | None
    psnr: float  # the task's (MRI: fastMRI's, against reconstruction_rss)
    ssim: float
    mean_iterations: float | None
    all_converged: bool | None
    latency_ms: float | None  # mean over slices of the per-slice median over rounds (None: not timed)
    latency_iqr_ms: float | None  # mean over slices of the per-slice interquartile range over rounds
    widths: str | None = None
    engine: str = ""  # what ran the priors: eager NCHW, channels-last, torch.compile, onnxruntime, ... (engine_label)
    precision: str = "fp32"  # what the priors computed in (fp32, or a schedule such as bf16->fp32)
    deployed_widths: str | None = None  # pruned -> deployed widths where zero filters were added ("19->32")
    width_choice: dict | None = None  # what the deploy-time width choice measured (spade_deploy.deploy.widths)
    n_slices: int = 0
    slices_on_cap: int | None = None  # slices that stopped on the iteration cap (None: no solver)
    ms_per_iteration: float | None = None
    slice_latency_ms: list[float] = field(default_factory=list)
    slice_iterations: list[int] = field(default_factory=list)
    speedup_vs_torch: float | None = None
    speedup_per_iteration: float | None = None
    efficiency: float | None = None
    speedup_same_backend: float | None = None
    # What to deploy for this variant on this back-end, from the same interleaved timing (add_speedups):
    # "variant" where the pruned model is at least as fast as its unpruned model there, "parent" where
    # it is slower (the ratio buys nothing here); None for unpruned or untimed rows.
    deploy: str | None = None
    # the task's secondary scores by name (Task.secondary_scores), columns of the result files
    scores: dict[str, float | None] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The row's fields with its secondary scores as fields of their own (result files)."""
        d = dataclasses.asdict(self)
        scores = d.pop("scores")
        return {**d, **scores}


@dataclass
class BenchResult:
    rows: list[BenchRow]
    config: dict
    device: str
    psnr_baseline: float  # the task's naive reconstruction (MRI: zero-filled RSS; SR: bicubic)
    examples: dict = field(default_factory=dict)
    ssim_baseline: float = float("nan")
    baseline: str = ""
    header: str = ""  # what the scores are (the task's description)
    secondary_columns: dict[str, tuple[str, str]] = field(default_factory=dict)  # Task.secondary_columns
    notes: list[str] = field(default_factory=list)  # lines the result files carry (e.g. variants left out, and why)

    def as_dict(self) -> dict:
        return {"device": self.device, "config": self.config, "baseline": self.baseline, "notes": self.notes,
                "psnr_baseline": self.psnr_baseline, "ssim_baseline": self.ssim_baseline,
                "rows": [r.as_dict() for r in self.rows]}


def _solver_kwargs(model: Reconstructor, solver: SolverConfig | None) -> dict:
    return {"solver": solver} if solver is not None and model.solver_cfg is not None else {}


class _Stopwatch:
    """Seconds of one call, device-synchronised (CUDA events on a GPU)."""

    def __init__(self, device: torch.device, timer: Callable[[], float] = time.perf_counter):
        self.device, self.timer = device, timer

    def start(self) -> None:
        sync_device(self.device)
        if self.device.type == "cuda":
            self.events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.events[0].record()
        else:
            self.t0 = self.timer()

    def stop(self) -> float:
        if self.device.type == "cuda":
            self.events[1].record()
            torch.cuda.synchronize(self.device)
            return self.events[0].elapsed_time(self.events[1]) / 1000.0
        return self.timer() - self.t0


@torch.no_grad()
def time_once(model: Reconstructor, y: torch.Tensor, physics, solver: SolverConfig | None = None,
              timer: Callable[[], float] = time.perf_counter) -> float:
    """Seconds of one whole reconstruction of ``y`` (device-synchronised; CUDA events on a GPU)."""
    watch = _Stopwatch(y.device, timer)
    watch.start()
    model(y, physics, **_solver_kwargs(model, solver))
    return watch.stop()


class _Clocked:
    """Times every call of ``model`` while in the ``with`` block (forward hooks), as
    :func:`time_once` times one, with its solver's bookkeeping: the evaluation of a timed variant,
    one slice per call, is its first timing round."""

    def __init__(self, model: Reconstructor, n_slices: int, device: torch.device, timer: Callable[[], float]):
        self.model, self.watch = model, _Stopwatch(device, timer)
        self.timings, self.calls = SliceTimings.empty(n_slices), 0

    def __enter__(self) -> "_Clocked":
        self.hooks = [self.model.register_forward_pre_hook(lambda *_: self.watch.start()),
                      self.model.register_forward_hook(lambda *_: self._stop())]
        return self

    def _stop(self) -> None:
        if self.calls >= len(self.timings.seconds):
            raise RuntimeError(f"the evaluation made more calls than the {len(self.timings.seconds)} slices")
        self.timings.record(self.calls, self.watch.stop(), self.model)
        self.calls += 1

    def __exit__(self, *exc) -> None:
        for h in self.hooks:
            h.remove()


def bench_slices(test_ds: Dataset, task: Task, device: torch.device) -> list:
    """Every sample of ``test_ds`` as ``(y, physics, label)``, measured as the task evaluates
    (MRI: fastMRI's per-file mask; label "file:slice")."""
    out = []
    for items in task.loader(test_ds, 1, shuffle=False, seed=0):
        batch = task.eval_batch(items)
        out.append((batch.y.to(device), batch.physics.to(device), task.sample_label(batch.keys[0])))
    return out


@dataclass
class SliceTimings:
    """One model's timings: ``seconds[j]`` the rounds' times of slice ``j``."""

    seconds: list[list[float]]
    iterations: list[int]  # per slice (1 for a model without a fixed-point solver: one pass)
    on_cap: list[bool]
    has_solver: bool

    @classmethod
    def empty(cls, n_slices: int) -> "SliceTimings":
        return cls([[] for _ in range(n_slices)], [1] * n_slices, [False] * n_slices, False)

    def record(self, j: int, seconds: float, model: Reconstructor) -> None:
        """One round's time of slice ``j`` and what the model's solver reports of it."""
        self.seconds[j].append(seconds)
        info = model.solve_info()
        if info is not None:
            self.has_solver = True
            self.iterations[j] = int(info.iterations.sum())
            self.on_cap[j] = not bool(info.converged.all())

    @property
    def median_ms(self) -> list[float]:
        return [1000 * statistics.median(t) for t in self.seconds]

    @property
    def latency_ms(self) -> float:
        """Mean over slices of each slice's median over rounds."""
        return float(np.mean(self.median_ms))

    @property
    def iqr_ms(self) -> float:
        return float(np.mean([1000 * np.subtract(*np.percentile(t, [75, 25])) for t in self.seconds]))

    @property
    def ms_per_iteration(self) -> float:
        return float(sum(self.median_ms) / sum(self.iterations))

    @property
    def slices_on_cap(self) -> int | None:
        return sum(self.on_cap) if self.has_solver else None


def time_interleaved(models: Sequence[Reconstructor], slices: Sequence, rounds: int, solver: SolverConfig | None = None,
                     timer: Callable[[], float] = time.perf_counter,
                     on_step: Callable[[int, int], None] | None = None,
                     earlier: Sequence[SliceTimings] | None = None) -> list[SliceTimings]:
    """Time every model on every slice ``(y, physics, ...)`` in interleaved rounds: round ``r``
    reconstructs every slice once with every model, the models' order rotated by ``r``, so drift
    on the machine hits all of them alike. ``on_step(r, i)`` before model ``i`` in round ``r``.
    ``earlier``: each model's timings of rounds already run (one entry per round and slice), which
    count among the ``rounds``."""
    n = len(models)
    out = list(earlier) if earlier is not None else [SliceTimings.empty(len(slices)) for _ in models]
    done = min((len(s) for t in out for s in t.seconds), default=0)
    for r in range(done, rounds):
        k = r % n if n else 0
        for i in list(range(k, n)) + list(range(k)):
            if on_step:
                on_step(r, i)
            for j, (y, physics, *_) in enumerate(slices):
                out[i].record(j, time_once(models[i], y, physics, solver=solver, timer=timer), models[i])
    return out


def run_bench(
    variants: Sequence[Variant],
    backends: dict[str, Callable[..., Reconstructor]],
    test_ds: Dataset,
    task: Task,
    solver: SolverConfig | None = None,
    warmup: int = 1,
    repeats: int = 5,
    device: str = "cpu",
    on_progress: Callable[[str, int, int], None] | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> BenchResult:
    """Score and time every variant on every back-end; ``backends[name](variant, sample)`` deploys
    one (``sample``: the first test slice's ``(y, physics)``, where the ``auto`` back-end measures).

    Each unpruned model is also measured in PyTorch when ``torch`` is not among ``backends``: it is
    the reference of the speed-ups. ``repeats`` is the number of interleaved timing rounds, each
    reconstructing every test slice once per variant (after ``warmup`` reconstructions of the first).
    The first round is the variant's evaluation, run one slice at a time: its scores come from the
    reconstructions that round times, so scoring costs no extra pass. Rows come per variant, in the
    order of ``backends``.
    """
    dev = torch.device(device)
    plan = []
    for v in variants:
        names = list(backends) if "torch" in backends or v.ratio > 0 else ["torch", *backends]
        plan += [(v, name, backends.get(name, lambda v, sample=None: placed(v.model, dev))) for name in names]
    slices = bench_slices(test_ds, task, dev)
    sample = slices[0][:2]
    macs = {id(v): prior_macs(v.model, tuple(sample[0].shape[-2:])) for v in variants}  # per variant, not per back-end
    total = len(plan) + (repeats - 1) * sum(v.timed for v, _, _ in plan)
    deployed, quality, first = [], [], {}
    for step, (v, name, deploy) in enumerate(plan):
        if on_progress:
            on_progress(f"round 1/{repeats} + quality: {v.label} r={v.ratio:g} {v.strategy or ''} on {name}", step, total)
        model = placed(deploy(v, sample), dev).eval()  # never moves the caller's model
        if v.timed:
            for _ in range(warmup):
                time_once(model, *sample, solver=solver, timer=timer)
            # The evaluation, one slice per call in the timing rounds' order, is the first round.
            with _Clocked(model, len(slices), dev, timer) as clock:
                res = evaluate(model, test_ds, task, solver=solver, batch_size=1)
            if clock.calls != len(slices):
                raise RuntimeError(f"the evaluation made {clock.calls} calls for {len(slices)} slices")
            first[step] = clock.timings
        else:
            res = evaluate(model, test_ds, task, solver=solver)
        deployed.append(model)
        quality.append(res)
    # The other rounds, interleaved: every variant reconstructs every slice once per round, order rotated.
    clocked = [i for i, (v, _, _) in enumerate(plan) if v.timed]

    def on_round(r: int, k: int) -> None:
        v, name, _ = plan[clocked[k]]
        if on_progress:
            on_progress(f"round {r + 1}/{repeats}: {v.label} r={v.ratio:g} {v.strategy or ''} on {name}",
                        len(plan) + len(clocked) * (r - 1) + k, total)

    timings = time_interleaved([deployed[i] for i in clocked], slices, repeats, solver=solver, timer=timer,
                               on_step=on_round, earlier=[first[i] for i in clocked])
    timed = dict(zip(clocked, timings))
    rows = [_row(v, name, deployed[i], quality[i], timed.get(i), macs[id(v)], len(slices), task)
            for i, (v, name, _) in enumerate(plan)]
    add_speedups(rows)
    cfg = {**task.options(),
           # the stopping rule every variant ran: the one given, else each architecture's own
           "solver": dataclasses.asdict(solver) if solver else ({v.label: dataclasses.asdict(v.model.solver_cfg)
                                                                 for v in variants if v.model.solver_cfg is not None} or None),
           "warmup": warmup, "rounds": repeats,
           "backends": list(backends), "aggregation": AGGREGATION, "host_allocator": allocator_state(),
           "slices": [s[2] for s in slices], "slice_shape": list(sample[0].shape[-2:]),
           "scores": task.scores_name, **(task.result_config(quality[0]) if quality else {})}
    zf = quality[0].psnr_baseline if quality else float("nan")
    zf_ssim = quality[0].ssim_baseline if quality else float("nan")
    return BenchResult(rows=rows, config=cfg, device=describe_device(dev), psnr_baseline=zf,
                       ssim_baseline=zf_ssim, baseline=task.baseline_name, header=task.bench_header,
                       secondary_columns=dict(task.secondary_columns))


def _row(v: Variant, backend: str, model: Reconstructor, res, t: SliceTimings | None, macs, n_slices: int,
         task: Task) -> BenchRow:
    """One variant's row: its scores and, where it was timed (``t``), its timings; untimed, the
    slices on the cap come from its evaluation where the task reports them."""
    capped = getattr(res, "not_converged", None)
    timing = dict(latency_ms=None, latency_iqr_ms=None,
                  slices_on_cap=None if res.mean_iterations is None or capped is None else len(capped))
    if t is not None:
        timing = dict(latency_ms=t.latency_ms, latency_iqr_ms=t.iqr_ms, slices_on_cap=t.slices_on_cap,
                      ms_per_iteration=t.ms_per_iteration, slice_latency_ms=t.median_ms,
                      slice_iterations=t.iterations if t.has_solver else [])
    return BenchRow(
        label=v.label, ratio=v.ratio, strategy=v.strategy, backend=backend, widths=v.widths,
        engine=engine_label(model, backend), precision=str(getattr(model, "precision", None) or "fp32"),
        **deployed_widths(model),
        params=count_parameters(v.model), macs=macs, psnr=res.psnr, ssim=res.ssim,
        mean_iterations=res.mean_iterations, all_converged=res.all_converged, n_slices=n_slices,
        scores=task.secondary_scores(res), **timing)


# What each engine of ``auto`` runs (spade_deploy.deploy.engines), as the tables name it.
ENGINE_NAMES = {"torch": "channels-last", "torch-compile": "torch.compile", "onnxruntime": "onnxruntime",
                "tensorrt": "TensorRT", "cuda-graph": "CUDA graph"}
# Engines that run the prior module itself (its deploy-time widths), not an exported file.
MODULE_ENGINES = ("torch", "torch-compile", "cuda-graph")


def engine_label(model: Reconstructor, backend: str) -> str:
    """What ran ``model``'s priors: the label its deployment set (``engine_label``), else named
    from the engines ``auto`` chose (``engine_choice``), else from the back-end (``torch``: the
    model as it is, eager PyTorch in NCHW)."""
    label = vars(model).get("engine_label")  # set on the deployed model, not the class's default
    if label:
        return str(label)
    choice = getattr(model, "engine_choice", None)
    if choice:
        return ",".join(ENGINE_NAMES.get(e, e) for e in sorted(set(choice.values())))
    return "eager NCHW" if backend == "torch" else ENGINE_NAMES.get(backend, backend)


def deployed_widths(model: Reconstructor) -> dict:
    """``deployed_widths`` ("19->32": pruned -> deployed, where zero filters were added and the
    engine runs the padded module) and ``width_choice`` (what was measured) of a deployed model."""
    choice = getattr(model, "width_choice", None)
    if choice is None:
        return {}
    engines = set((getattr(model, "engine_choice", None) or {}).values())
    runs_module = not engines or engines <= set(MODULE_ENGINES)
    record = choice.as_dict()
    if choice.padded and not runs_module:
        record["note"] = "the engine runs the exported priors at their pruned widths"
    return {"deployed_widths": (choice.label() or None) if runs_module else None, "width_choice": record}


def add_speedups(rows: Sequence[BenchRow]) -> None:
    """Each architecture against its own unpruned model: in PyTorch (whole reconstruction, per
    iteration, efficiency) and on the same back-end. Left ``None`` where that reference is absent."""
    for r in rows:
        if r.latency_ms is None:
            continue
        base_torch = next((b for b in rows if b.label == r.label and b.ratio == 0 and b.backend == "torch"
                           and b.latency_ms is not None), None)
        same = next((b for b in rows if b.label == r.label and b.ratio == 0 and b.backend == r.backend
                     and b.latency_ms is not None), None)
        if base_torch:
            r.speedup_vs_torch = base_torch.latency_ms / r.latency_ms
            if base_torch.ms_per_iteration and r.ms_per_iteration:
                r.speedup_per_iteration = base_torch.ms_per_iteration / r.ms_per_iteration
                if base_torch.macs and r.macs:
                    r.efficiency = r.speedup_per_iteration / (base_torch.macs / r.macs)
        if same:
            r.speedup_same_backend = same.latency_ms / r.latency_ms
            if r.ratio > 0:
                r.deploy = "variant" if r.speedup_same_backend >= 1.0 else "parent"


def buys_nothing(result: BenchResult) -> list[str]:
    """One line per pruned variant slower than its unpruned model on the same back-end (``deploy`` =
    "parent"): on this device the unpruned model is what to deploy there."""
    return [f"{r.label} {r.ratio:.0%} {r.strategy or ''} ({r.widths or 'paper'} widths) on {r.backend}: "
            f"x{r.speedup_same_backend:.2f} against the unpruned model on the same back-end; this variant buys "
            f"nothing on {result.device}: deploy the unpruned model there"
            for r in result.rows if r.deploy == "parent"]


def prior_macs(model: Reconstructor, size: tuple[int, int]) -> int:
    """MACs of one call of every prior on one slice of ``size`` (one outer iteration's CNN cost)."""
    return sum(count_macs(p, model.prior_example_input(n, *size)) for n, p in model.priors().items())


# ------------------------------------------------------------------------------------------------
_LEADING = ["model", "ratio", "strategy", "widths", "deployed widths", "backend", "engine", "precision", "params",
            "MACs", "PSNR", "SSIM"]
_TRAILING = ["iterations", "on cap", "ms/slice", "ms/iter", "speed-up", "per iter", "efficiency", "same backend",
             "deploy"]
NONE = "–"  # no reference measured: never a default ratio


def columns(result: BenchResult) -> list[str]:
    """The table's columns: the task's secondary scores' after SSIM."""
    return [*_LEADING, *result.secondary_columns, *_TRAILING]


def _x(value: float | None) -> str:
    return NONE if value is None else f"x{value:.2f}"


def table_rows(result: BenchResult) -> list[list[str]]:
    out = []
    for r in result.rows:
        out.append([
            r.label, f"{r.ratio:.0%}" if r.ratio else "0%", r.strategy or NONE, r.widths or NONE,
            r.deployed_widths or NONE, r.backend, r.engine or r.backend, r.precision or "fp32", f"{r.params:,}",
            f"{r.macs / 1e9:.2f}G" if r.macs else NONE, f"{r.psnr:.2f}",
            f"{r.ssim:.4f}",
            *(NONE if r.scores.get(key) is None else fmt.format(r.scores[key])
              for key, fmt in result.secondary_columns.values()),
            f"{r.mean_iterations:.1f}" if r.mean_iterations is not None else NONE,
            NONE if r.slices_on_cap is None else (f"{r.slices_on_cap}/{r.n_slices}" if r.slices_on_cap else "0"),
            f"{r.latency_ms:.1f}" if r.latency_ms is not None else NONE, f"{r.ms_per_iteration:.2f}" if r.ms_per_iteration is not None else NONE,
            _x(r.speedup_vs_torch), _x(r.speedup_per_iteration),
            NONE if r.efficiency is None else f"{r.efficiency:.2f}", _x(r.speedup_same_backend),
            {"variant": "variant", "parent": "parent (buys nothing)"}.get(r.deploy or "", NONE),
        ])
    return out


def _header(result: BenchResult) -> str:
    baseline = (result.baseline or "baseline")[:1].upper() + (result.baseline or "baseline")[1:]
    return (f"Device: {result.device}. Scores: {result.header or 'the task'}. {baseline} PSNR "
            f"{result.psnr_baseline:.2f} dB. {AGGREGATION}; "
            "speed-ups against the unpruned PyTorch model (whole reconstruction, per outer iteration), "
            "efficiency = per-iteration speed-up / MAC ratio, \"on cap\" = slices stopped by the iteration cap, "
            "no latency = scored, not timed, \"deployed widths\" = pruned -> deployed widths where the deployment "
            "padded a pruned prior with zero filters (the same function) to widths this device runs faster. "
            f"Config: `{json.dumps(result.config)}`.")


def write_results(result: BenchResult, out_dir: str | Path, stem: str = "bench") -> dict[str, Path]:
    """JSON (with config), CSV (config in its leading ``#`` lines) and Markdown, each written atomically."""
    out = Path(out_dir)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv", "md": out / f"{stem}.md"}
    write_json(paths["json"], result.as_dict())
    buf = io.StringIO()
    buf.write(f"# device: {result.device}\n# config: {json.dumps(result.config)}\n# {AGGREGATION}\n")
    buf.writelines(f"# note: {line}\n" for line in result.notes)
    w = csv.writer(buf)
    rows = [r.as_dict() for r in result.rows]
    fields = list(rows[0]) if rows else [f.name for f in dataclasses.fields(BenchRow) if f.name != "scores"]
    w.writerow(fields)
    for d in rows:
        w.writerow([json.dumps(d.get(k)) if isinstance(d.get(k), (list, dict)) else d.get(k) for k in fields])
    write_text(paths["csv"], buf.getvalue())
    cols = columns(result)
    md = [_header(result), "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(row) + " |" for row in table_rows(result)]
    md += ["", *(f"Note: {line}" for line in result.notes)] if result.notes else []
    write_text(paths["md"], "\n".join(md) + "\n")
    return paths


def plot_degradation(result: BenchResult, path: str | Path, backend: str = "torch") -> Path:
    """PSNR degradation (%) against pruning ratio, one line per strategy and one panel per
    architecture (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if r.backend == backend]
    labels = list(dict.fromkeys(r.label for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 3.5), squeeze=False)
    for ax, label in zip(axes[0], labels):
        mine = [r for r in rows if r.label == label]
        base = next(r for r in mine if r.ratio == 0)
        for strategy in sorted({r.strategy for r in mine if r.strategy}):
            colour = None
            for widths in sorted({r.widths or "paper" for r in mine if r.strategy == strategy}, key=lambda w: w != "paper"):
                pts = sorted((r.ratio, 100 * (base.psnr - r.psnr) / base.psnr) for r in mine
                             if r.strategy == strategy and (r.widths or "paper") == widths)
                line, = ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], color=colour,
                                marker="o" if widths == "paper" else "D", ls="-" if widths == "paper" else "none",
                                label=strategy if widths == "paper" else f"{strategy} ({widths} widths)")
                colour = line.get_color()
        ax.set_xlabel("per-layer pruning ratio (%)")
        ax.set_ylabel("PSNR degradation (%)")
        ax.set_title(f"{label} on {backend}: PSNR degradation vs pruning\n({base.psnr:.2f} dB unpruned)", fontsize=9)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_examples(variants: Sequence[Variant], test_ds: Dataset, task: Task,
                  path: str | Path, index: int = 0, ratio: float | None = None) -> Path:
    """One test sample of one architecture's ``variants``: the reference, the task's baseline, the
    unpruned model and the pruned variants at ``ratio`` (default: the largest), each as the task
    scores it (:meth:`Task.shown`), labelled with its PSNR and its degradation against the unpruned
    model (the paper's Figures 5-8)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = task.eval_batch(task.collate([test_ds[index]]))
    ratio = ratio if ratio is not None else max(v.ratio for v in variants)
    shown = [v for v in variants if v.ratio == 0] + [v for v in variants if v.ratio == ratio and v.ratio > 0]
    ref = task.shown_reference(batch)
    zf = task.shown(batch, task.baseline(batch))
    panels = [("reference", ref, None), (task.baseline_name, zf, None)]
    lr = task.shown_input(batch)
    if lr is not None:
        panels.insert(0, ("input", lr, None))
    for v in shown:
        x = task.shown(batch, v.model.eval()(*on_model_device((batch.y, batch.physics), v.model)).cpu())
        widths = "" if v.ratio == 0 or (v.widths or "paper") == "paper" else f" ({v.widths} widths)"
        name = "unpruned" if v.ratio == 0 else f"{v.ratio:g}{widths}: {v.strategy}"
        panels.append((name, x, v.ratio == 0))
    base_psnr = None
    fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.8))
    for ax, (name, img, is_base) in zip(axes, panels):
        ax.imshow(img, cmap="gray", vmin=0, vmax=ref.max()) if img.ndim == 2 else ax.imshow(img.clip(0, 1))
        ax.set_title(name, fontsize=8)
        ax.axis("off")
        if name not in ("reference", "input"):
            p = task.example_psnr(ref, img)
            if is_base:
                base_psnr = p
            ax.text(3, 12, f"{p:.2f} dB", color="yellow", fontsize=8)
            if base_psnr is not None and not is_base and name != task.baseline_name:
                ax.text(3, img.shape[0] - 6, f"{100 * (base_psnr - p) / base_psnr:+.1f} %", color="cyan", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
