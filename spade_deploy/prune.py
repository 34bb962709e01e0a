"""SPADE structured pruning (section 3 of the paper) on top of Torch-Pruning's DepGraph.

Each prior is pruned on its own, traced on its own real-valued example input: DepGraph groups the
coupled layers (a residual trunk is one group), every group is ranked by the group L1 norm of eq. (6)
— for channel ``k``, the mean over the group's ``M`` layers of ``||w_k^i||_1`` — and the
``ratio`` least important channels of every group are removed (local, not global, pruning).
Output convolutions are never pruned, so priors keep their 2-channel interface.

Importance: ``GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)`` is eq. (6)
exactly (per-layer L1 norms of each channel's filters, averaged over the group, no normalisation).

Widths: the paper keeps ``int(c * (1 - ratio))`` of every group's ``c`` channels (the default);
``round_to=N`` rounds that down to a multiple of ``N`` (torch-pruning's ``round_to``);
``round_to="auto"`` keeps, per group, the fastest of the widths near the paper's count that the run
device runs fastest per useful MAC (:func:`spade_deploy.hwaware.choose_widths`), handed to torch-pruning as a per-group
``pruning_ratio_dict``; where no width near the paper's runs faster than the group's whole width
on that device, the group is kept whole, and where the pruned priors, timed against the unpruned
ones, gain less than :data:`MIN_GAIN`, the ratio *buys nothing* here (:attr:`PruneReport.buys_nothing`,
said by ``spade prune`` and the demo, recorded in the manifest). :func:`search_speedup` searches the
ratio whose *measured* prior latency is a given factor below the unpruned prior's.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from .checkpoint import load_model, save_model
from .errors import SpadeError
from .hwaware import TOLERANCE, DeviceTimer, GroupWidth, Timer, choose_widths, keeps_whole, ratio_keeping
from .models import Reconstructor, count_parameters, layer_shapes
from .paths import sha256_file

PAPER_RATIOS = (0.05, 0.1, 0.2, 0.4)
# The input size latencies and convolution widths are measured at: the embedded data's 160 x 160.
MEASURE_SIZE = (160, 160)
# Measured widths whose priors run less than this fraction faster than the unpruned ones buy nothing.
MIN_GAIN = 0.03


@dataclass
class PriorReport:
    name: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    widths: dict[str, list[int]] = field(default_factory=dict)
    groups: list[GroupWidth] = field(default_factory=list)  # "auto" widths: what was measured and chosen


@dataclass
class PruneReport:
    ratio: float
    round_to: int | str | None
    params_before: int
    params_after: int
    priors: list[PriorReport]
    example_size: tuple[int, int]
    measure_size: tuple[int, int] | None = None  # "auto" widths: the input size convolutions were timed at
    device: str | None = None
    speedup: "SpeedupSearch | None" = None
    # "auto" widths: all priors timed against the unpruned ones, interleaved ({"unpruned": ms, "pruned": ms})
    prior_ms: dict[str, float] = field(default_factory=dict)
    parent_widths: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # prior -> layer -> [in, out]

    @property
    def gain(self) -> float | None:
        """The measured fall of the priors' time (0.25: 25 % faster), None where not measured."""
        if not self.prior_ms:
            return None
        return 1 - self.prior_ms["pruned"] / self.prior_ms["unpruned"]

    @property
    def buys_nothing(self) -> bool:
        """Measured widths that keep every group whole, or gain less than :data:`MIN_GAIN` here."""
        groups = [g for p in self.priors for g in p.groups]
        whole = keeps_whole(groups)
        return whole or (self.gain is not None and self.gain < MIN_GAIN)

    def verdict(self) -> str | None:
        """One line where measured widths buy nothing on the measuring device, else None."""
        if self.round_to != "auto" or not self.buys_nothing:
            return None
        why = ("no width near the paper's runs faster than the whole group: every group kept whole"
               if keeps_whole(g for p in self.priors for g in p.groups)
               else f"the pruned priors run only {100 * (self.gain or 0):.1f} % faster (< {100 * MIN_GAIN:g} %)")
        measured = (f" ({self.prior_ms['unpruned']:.2f} -> {self.prior_ms['pruned']:.2f} ms per call of the priors)"
                    if self.prior_ms else "")
        return f"ratio {self.ratio:g} buys nothing on {self.device}: {why}{measured}"

    @property
    def macs_before(self) -> int:
        return sum(p.macs_before for p in self.priors)

    @property
    def macs_after(self) -> int:
        return sum(p.macs_after for p in self.priors)

    @property
    def widths(self) -> str:
        return widths_label(self.round_to)

    def manifest_entry(self, parent: str, parent_sha256: str | None = None) -> dict:
        """The pruned checkpoint's ``pruning`` manifest entry (what the bench and fine-tuning read);
        ``parent_sha256`` binds it to the exact bytes of the parent file."""
        entry = {
            "ratio": self.ratio, "round_to": self.round_to, "widths": self.widths, "parent": parent,
            "parent_sha256": parent_sha256,
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "macs_input": list(self.example_size),
        }
        if self.parent_widths:
            entry["parent_widths"] = self.parent_widths
        if any(p.groups for p in self.priors):
            entry["hardware"] = {
                "device": self.device, "input": list(self.measure_size or ()), "tolerance": TOLERANCE,
                "groups": {p.name: [g.as_dict() for g in p.groups] for p in self.priors},
                "prior_ms": {k: round(v, 4) for k, v in self.prior_ms.items()},
                "gain": None if self.gain is None else round(self.gain, 4),
                "buys_nothing": self.buys_nothing,
            }
        if self.speedup is not None:
            entry["target_speedup"] = self.speedup.as_dict()
        return entry


@dataclass
class SpeedupSearch:
    """What :func:`search_speedup` reached: the measured prior latencies of the unpruned and the
    chosen pruned model (same interleaved run), and every ratio it tried."""

    target: float
    ratio: float
    speedup: float
    unpruned_ms: float
    pruned_ms: float
    device: str
    input: tuple[int, int]
    tried: list[tuple[float, float]] = field(default_factory=list)  # (ratio, measured speed-up)

    @property
    def reached(self) -> bool:
        return abs(self.speedup / self.target - 1) <= 0.1

    def as_dict(self) -> dict:
        return {"target": self.target, "ratio": self.ratio, "speedup": round(self.speedup, 4),
                "unpruned_ms": round(self.unpruned_ms, 4), "pruned_ms": round(self.pruned_ms, 4),
                "device": self.device, "input": list(self.input),
                "tried": [[round(r, 4), round(s, 4)] for r, s in self.tried]}


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) < 1.0):
        raise SpadeError(f"pruning ratio must lie strictly between 0 and 1, got {ratio}")
    return float(ratio)


def check_widths(round_to) -> int | str | None:
    """``None`` / ``"paper"`` (paper-exact), ``"auto"`` (measured on the device) or a positive ``N``."""
    if round_to is None or round_to == "paper":
        return None
    if round_to == "auto":
        return "auto"
    if isinstance(round_to, str) and round_to.strip().isdigit():
        round_to = int(round_to)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise SpadeError(f"--round-to must be a positive integer or 'auto', got {round_to!r}")
    return round_to


def widths_label(round_to) -> str:
    round_to = check_widths(round_to)
    return "paper" if round_to is None else "auto" if round_to == "auto" else f"round-to {round_to}"


def pruned_name(stem: str, ratio: float, round_to=None, target_speedup: float | None = None) -> str:
    """``best.pruned-0.4.safetensors`` (paper widths), ``best.pruned-0.4.hw...`` (measured widths),
    ``best.pruned-0.4.round8...``; ``best.pruned-x2...`` for a latency target."""
    round_to = check_widths(round_to)
    what = f"x{target_speedup:g}" if target_speedup is not None else f"{ratio:g}"
    suffix = "" if round_to is None else ".hw" if round_to == "auto" else f".round{round_to}"
    return f"{stem}.pruned-{what}{suffix}.safetensors"


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    macs, _ = tp.utils.count_ops_and_params(module, example)
    return int(macs)


def default_timer(device: str | None = None) -> DeviceTimer:
    return DeviceTimer(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def prune_model(
    model: Reconstructor,
    ratio: float,
    round_to: int | str | None = None,
    example_size: tuple[int, int] = (64, 64),
    timer: Timer | None = None,
    measure_size: tuple[int, int] = MEASURE_SIZE,
    measure_gain: bool = True,
) -> tuple[Reconstructor, PruneReport]:
    """Return a pruned deep copy of ``model`` and what changed.

    ``round_to="auto"`` times the priors' convolutions with ``timer`` (default: PyTorch on the
    CUDA GPU if any, else the CPU) at ``measure_size``; MACs are counted at ``example_size``. Only
    the deployed priors (:meth:`Reconstructor.priors`) get measured widths: a module pruned with
    them but left in PyTorch (USRNet's hyper-parameter MLP, a few microseconds on a 1 x 1 input)
    keeps the paper's count, which its timing noise would otherwise move at random. With "auto"
    widths and ``measure_gain``, the pruned priors are then timed against the unpruned ones
    (:attr:`PruneReport.gain`, :attr:`PruneReport.buys_nothing`)."""
    ratio = check_ratio(ratio)
    round_to = check_widths(round_to)
    if round_to == "auto" and timer is None:
        timer = default_timer()
    pruned = copy.deepcopy(model).eval()
    params_before = count_parameters(model)
    reports = []
    deployed = set(pruned.priors())
    for name, prior in pruned.prunable().items():
        example = pruned.prior_example_input(name, *example_size)
        before = (count_parameters(prior), count_macs(prior, example))
        with torch.no_grad():
            shape = prior(example).shape  # a prior may change the channel count (USRNet: 4 -> 3)
        importance = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
        groups: list[GroupWidth] = []
        ratio_dict = None
        if round_to == "auto" and name in deployed:
            chosen = choose_widths(prior, example, pruned.prior_example_input(name, *measure_size), ratio,
                                   pruned.prior_output_layers(name), timer)
            groups = [g for _, g in chosen]
            # One local scope per group, pruned to exactly the chosen width.
            ratio_dict = {root: ratio_keeping(g.channels, g.chosen) if g.chosen < g.channels else 0.0
                          for root, g in chosen}
        with warnings.catch_warnings():
            # 0-d learnable scalars (the EDSR residual scale) have no channel dimension to prune.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = tp.pruner.MetaPruner(
                prior,
                example,
                importance=importance,
                pruning_ratio=ratio,
                pruning_ratio_dict=ratio_dict,
                global_pruning=False,
                ignored_layers=pruned.prior_output_layers(name),
                round_to=round_to if isinstance(round_to, int) else None,
            )
            pruner.step()
        with torch.no_grad():
            out = prior(example)
        if out.shape != shape:
            raise SpadeError(f"prior {name!r} changed its output shape after pruning: {tuple(out.shape)}")
        pruned.set_prior(name, prior)
        reports.append(PriorReport(name, before[0], count_parameters(prior), before[1], count_macs(prior, example),
                                   {k: v for k, v in layer_shapes(prior).items()}, groups))
    report = PruneReport(ratio, round_to, params_before, count_parameters(pruned), reports, tuple(example_size),
                         tuple(measure_size) if round_to == "auto" else None,
                         timer.device if round_to == "auto" else None,
                         parent_widths={n: layer_shapes(p) for n, p in model.priors().items()})
    if round_to == "auto" and measure_gain and not keeps_whole(g for p in reports for g in p.groups):
        sec = timer.prior_seconds({"unpruned": model, "pruned": pruned}, tuple(measure_size))
        report.prior_ms = {k: 1000 * v for k, v in sec.items()}
    return pruned, report


def search_speedup(
    model: Reconstructor,
    target: float,
    round_to: int | str | None = None,
    timer: Timer | None = None,
    size: tuple[int, int] = MEASURE_SIZE,
    tolerance: float = 0.05,
    max_steps: int = 8,
    max_ratio: float = 0.95,
) -> tuple[Reconstructor, PruneReport]:
    """Prune ``model`` at the per-layer ratio whose measured prior latency at ``size`` is ``target``
    times below the unpruned prior's.

    Bisection on the ratio (latency falls as it grows), started at ``1 - 1/sqrt(target)`` (where the
    MACs of c -> c convolutions fall ``target`` times); each step prunes, then times the unpruned
    and the pruned priors in one interleaved run. Stops within ``tolerance`` of the target or after
    ``max_steps``, and returns the step closest to it; ``report.speedup`` says what it reached,
    timed once more for the chosen model (unless it was the only step)."""
    if not (isinstance(target, (int, float)) and target > 1):
        raise SpadeError(f"--target-speedup must be greater than 1, got {target}")
    round_to = check_widths(round_to)
    timer = timer or default_timer()
    lo, hi = 0.0, max_ratio
    ratio = min(max(1 - 1 / math.sqrt(target), 0.01), max_ratio)
    best = None
    tried = []
    seen: dict[str, dict] = {}  # ratios that keep the same widths are the same model: timed once
    for _ in range(max_steps):
        pruned, report = prune_model(model, ratio, round_to, timer=timer, measure_size=size, measure_gain=False)
        shapes = repr(sorted((p.name, sorted(p.widths.items())) for p in report.priors))
        sec = seen.get(shapes) or timer.prior_seconds({"unpruned": model, "pruned": pruned}, size)
        seen[shapes] = sec
        speedup = sec["unpruned"] / sec["pruned"]
        tried.append((ratio, speedup))
        err = abs(math.log(speedup / target))
        if best is None or err < best[0]:
            best = (err, pruned, report, ratio, speedup, sec)
        if abs(speedup / target - 1) <= tolerance:
            break
        if speedup < target:
            lo = ratio
        else:
            hi = ratio
        ratio = (lo + hi) / 2
    _, pruned, report, ratio, speedup, sec = best
    if len(tried) > 1:  # what is reported is measured again, on its own, not the best of noisy draws
        sec = timer.prior_seconds({"unpruned": model, "pruned": pruned}, size)
        speedup = sec["unpruned"] / sec["pruned"]
    report.speedup = SpeedupSearch(float(target), ratio, speedup, 1000 * sec["unpruned"], 1000 * sec["pruned"],
                                   timer.device, tuple(size), tried)
    return pruned, report


def _load_unpruned(src: str | Path, out_dir: str | Path):
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpadeError(f"output path {out} is a file, expected a folder")
    model, manifest = load_model(src)
    if manifest.get("pruning"):
        raise SpadeError(f"{src} is already pruned; prune the unpruned model")
    return model, manifest, out


def prune_checkpoint(
    src: str | Path, ratios: list[float], out_dir: str | Path, round_to: int | str | None = None,
    timer: Timer | None = None, measure_size: tuple[int, int] = MEASURE_SIZE,
) -> list[tuple[Path, PruneReport]]:
    """Prune a checkpoint at each ratio; write ``<out_dir>/<stem>.pruned-<ratio>[.hw].safetensors``."""
    ratios = [check_ratio(r) for r in ratios]
    round_to = check_widths(round_to)
    model, manifest, out = _load_unpruned(src, out_dir)
    if round_to == "auto" and timer is None:
        timer = default_timer()
    results = []
    src_sha = sha256_file(src)
    for ratio in ratios:
        pruned, report = prune_model(model, ratio, round_to, timer=timer, measure_size=measure_size)
        path = out / pruned_name(Path(src).stem, ratio, round_to)
        save_model(path, pruned, pruning=report.manifest_entry(str(src), src_sha),
                   train_config=manifest.get("train_config"))
        results.append((path, report))
    return results


def prune_to_speedup(
    src: str | Path, target: float, out_dir: str | Path, round_to: int | str | None = None,
    timer: Timer | None = None, size: tuple[int, int] = MEASURE_SIZE,
) -> tuple[Path, PruneReport]:
    """:func:`search_speedup` on a checkpoint; write ``<out_dir>/<stem>.pruned-x<target>[.hw].safetensors``."""
    model, manifest, out = _load_unpruned(src, out_dir)
    pruned, report = search_speedup(model, target, round_to, timer=timer, size=size)
    path = out / pruned_name(Path(src).stem, report.ratio, round_to, target_speedup=target)
    save_model(path, pruned, pruning=report.manifest_entry(str(src), sha256_file(src)),
               train_config=manifest.get("train_config"))
    return path, report
