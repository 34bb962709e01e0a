"""Deploy-time widths: a pruned prior padded with zero filters up to the widths this device runs fastest.

A pruned layer is not always faster than the parent's: on one x86-64 CPU a 3x3 convolution from 32
channels took 1.32 / 1.36 / 1.19 ms for 19 / 26 / 32 outputs (the parent's 32 the fastest), on
another 17 to 32 outputs cost the same. Which widths pay is a property of the deploying device, not
of the checkpoint, so it is decided there: per DepGraph group of each pruned prior, among the widths
from the pruned one up to the parent's, the one whose convolutions run fastest on this device
(:class:`~spade_deploy.hwaware.Timer`, measured at the data's size; the group's neighbours at their
latest choice, repeated until no group changes). The group is then padded to it with zero filters:

* every layer writing the group's channels (Conv2d / ConvTranspose2d output filters, and every
  convolution of a residual trunk) gets zero filters with zero bias, so the new channels are 0;
* per-channel layers on the way (BatchNorm, InstanceNorm: zero scale and shift; activations with
  f(0) = 0, residual adds) keep them 0, and every layer reading them gets zero input weights.

The padded prior computes exactly the same function (up to float summation order). Layers that mix
channels otherwise (GroupNorm, LayerNorm, Linear, grouped convolutions) are not padded: the prior is
deployed as pruned. As a whole, the padded model is kept only where an interleaved timing of all its
priors is faster than the unpadded one's; so the per-iteration cost of a deployed pruned variant is
at most the cost of its parent's widths on this device, measured, not assumed.

Where the group's channels are placed in a concatenation (a U-Net's skip connections), DepGraph's
index mapping says where the group's last channel lands in every layer; the zeros go right after it.
The parent's widths are the architecture the model's own config builds (the unpruned model).
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..hwaware import MARGIN, DeviceTimer, Timer, search_widths
from ..models import Reconstructor, build_model, layer_shapes

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)
# An interleaved timing of the padded priors must beat the unpadded ones by this fraction.
GUARD_MARGIN = 0.02
EXACT_TOL = 1e-4  # padded and unpadded priors agree within this relative error (as the engines' check)


class PaddingUnsupported(Exception):
    """A layer of the group mixes channels in a way zero filters cannot keep exact."""


# ------------------------------------------------------------------------------------------------
# Zero padding of DepGraph groups
# ------------------------------------------------------------------------------------------------
def _trace(prior: nn.Module, example: torch.Tensor):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(prior, example_inputs=example)


def _group_roots(dg, ignored: list[nn.Module]) -> list[tuple[nn.Module, int]]:
    """``(root convolution, channels)`` of every prunable group (as pruning found them)."""
    out = []
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=_CONVS):
        root = group[0].dep.target.module
        channels = dg.get_out_channels(root)
        if channels:
            out.append((root, int(channels)))
    return out


def _insertions(dg, root: nn.Module, channels: int, extra: int) -> dict[tuple[nn.Module, str], int]:
    """Where ``extra`` channels appended to ``root``'s group land in each of its layers:
    ``(module, "out" | "in") -> index`` of the first new channel in that layer's new layout."""
    fn = dg.get_pruner_of_module(root).prune_out_channels
    group = dg.get_pruning_group(root, fn, [channels - 1])
    where: dict[tuple[nn.Module, str], int] = {}
    for item in group:
        dep, idxs = item.dep, list(item.idxs)
        module = dep.target.module
        own = [p for p in module.parameters(recurse=False)] + [b for b in module.buffers(recurse=False)]
        if not isinstance(module, (*_CONVS, _BatchNorm, _InstanceNorm)):
            if own:  # a layer with weights of its own that is not per-channel
                raise PaddingUnsupported(f"{type(module).__name__} in the group")
            continue  # activations, adds, concatenations, reshapes: no weights
        if len(idxs) != 1:
            raise PaddingUnsupported(f"{type(module).__name__}: one channel maps to {len(idxs)}")
        side = "out" if dg.is_out_channel_pruning_fn(dep.handler) else "in"
        if isinstance(module, _CONVS) and module.groups != 1:
            raise PaddingUnsupported("grouped convolution")
        if not isinstance(module, _CONVS):
            side = "out"  # a norm's channels are its input's and its output's
        pos = int(idxs[0]) + 1
        if where.setdefault((module, side), pos) != pos:
            raise PaddingUnsupported(f"{type(module).__name__} reached at two places")
    return where


def _insert(t: torch.Tensor, dim: int, pos: int, n: int, value: float = 0.0) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] = n
    fill = torch.full(shape, value, dtype=t.dtype, device=t.device)
    return torch.cat([t.narrow(dim, 0, pos), fill, t.narrow(dim, pos, t.shape[dim] - pos)], dim=dim)


def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        setattr(module, name, tensor)


@torch.no_grad()
def _pad_layer(module: nn.Module, side: str, pos: int, n: int) -> None:
    if isinstance(module, _CONVS):
        transposed = isinstance(module, nn.ConvTranspose2d)
        if side == "out":
            _set(module, "weight", _insert(module.weight, 1 if transposed else 0, pos, n))
            if module.bias is not None:
                _set(module, "bias", _insert(module.bias, 0, pos, n))
            module.out_channels += n
        else:
            _set(module, "weight", _insert(module.weight, 0 if transposed else 1, pos, n))
            module.in_channels += n
        return
    # BatchNorm / InstanceNorm: zero scale and shift (output 0 whatever comes in), neutral statistics
    for name, value in (("weight", 0.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
        if getattr(module, name, None) is not None:
            _set(module, name, _insert(getattr(module, name), 0, pos, n, value))
    module.num_features += n


def pad_prior(prior: nn.Module, example: torch.Tensor, widths: dict[str, int],
              ignored: list[nn.Module] | None = None) -> nn.Module:
    """A copy of ``prior`` whose groups (named by their root convolution) are padded with zero
    filters to ``widths[name]`` channels; the same function. :class:`PaddingUnsupported` where a
    group holds a layer zero filters cannot keep exact. ``ignored``: the prior's output layers,
    never part of a group (given as modules of ``prior``)."""
    index = {m: i for i, m in enumerate(prior.modules())}
    padded = copy.deepcopy(prior)
    mods = list(padded.modules())
    dg = _trace(padded, example)
    names = {m: n for n, m in padded.named_modules()}
    ign = [mods[index[m]] for m in (ignored or [])]
    plan: dict[tuple[nn.Module, str], list[tuple[int, int]]] = {}
    for root, channels in _group_roots(dg, ign):
        want = widths.get(names[root], channels)
        if want < channels:
            raise ValueError(f"group {names[root]!r} has {channels} channels, cannot pad to {want}")
        if want > channels:
            for key, pos in _insertions(dg, root, channels, want - channels).items():
                plan.setdefault(key, []).append((pos, want - channels))
    for (module, side), inserts in plan.items():
        for pos, n in sorted(inserts, reverse=True):  # from the last position: earlier ones stay valid
            _pad_layer(module, side, pos, n)
    return padded


# ------------------------------------------------------------------------------------------------
# The widths to deploy
# ------------------------------------------------------------------------------------------------
def parent_widths(model: Reconstructor) -> dict[str, dict[str, list[int]]] | None:
    """``{prior: {layer: [in, out]}}`` of the unpruned architecture the model's config builds (on
    the meta device: nothing allocated); None where the model does not say what it was built as."""
    name, config = getattr(model, "registry_name", ""), getattr(model, "config", None)
    if not name or config is None:
        return None
    try:
        with torch.device("meta"):
            parent = build_model(name, config=config)
    except Exception:  # noqa: BLE001 - no parent to compare with: deployed as it is
        return None
    return {n: layer_shapes(p) for n, p in parent.priors().items()}


@dataclass
class GroupChoice:
    """One group of one prior: its pruned and parent widths, the width measured fastest for it
    (its neighbours at their latest choice) and what was measured."""

    layer: str  # the group's root convolution
    pruned: int
    parent: int
    fastest: int
    ms: dict[int, float] = field(default_factory=dict)  # the group's convolutions at each width

    def as_dict(self) -> dict:
        return {"layer": self.layer, "pruned": self.pruned, "parent": self.parent, "fastest": self.fastest,
                "ms": {str(w): round(t, 4) for w, t in self.ms.items()}}


@dataclass
class WidthChoice:
    """What :func:`deploy_widths` measured and decided for one model on one device.

    Candidates (each ``{prior: {group root: width}}``): ``measured`` (every group at the width
    measured fastest for it) and ``parent`` (every group at the parent's width: the fallback that
    makes a pruned variant never costlier per call than its parent's widths, where a group's choice
    alone, its neighbours fixed, misses a gain only widening them together brings). ``kept``: the
    candidate deployed, or ``"pruned"``."""

    device: str
    input: tuple[int, int]
    groups: dict[str, list[GroupChoice]]  # prior -> its groups
    candidates: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    kept: str = "pruned"
    prior_ms: dict[str, float] = field(default_factory=dict)  # whole priors per candidate (and "pruned")
    note: str = ""

    @property
    def padded(self) -> bool:
        return self.kept != "pruned"

    @property
    def widths(self) -> dict[str, dict[str, int]]:
        """``{prior: {group root: width}}`` as deployed."""
        return {p: {g.layer: self.candidates.get(self.kept, {}).get(p, {}).get(g.layer, g.pruned) for g in gs}
                for p, gs in self.groups.items()}

    def label(self) -> str:
        """``"19->32"`` (pruned -> deployed, each distinct pair) where padding is deployed, else ``""``."""
        if not self.padded:
            return ""
        widths = self.widths
        pairs = sorted({(g.pruned, widths[p][g.layer]) for p, gs in self.groups.items() for g in gs
                        if widths[p][g.layer] != g.pruned})
        return ", ".join(f"{a}->{b}" for a, b in pairs)

    def as_dict(self) -> dict:
        return {"device": self.device, "input": list(self.input), "kept": self.kept, "padded": self.padded,
                "widths": self.widths, "prior_ms": {k: round(v, 4) for k, v in self.prior_ms.items()},
                "note": self.note, "groups": {p: [g.as_dict() for g in gs] for p, gs in self.groups.items()}}


def _fastest(prior: nn.Module, trace: torch.Tensor, sized: torch.Tensor, ignored: list[nn.Module],
             parent: dict[str, list[int]], timer: Timer, margin: float, max_passes: int = 4) -> list[GroupChoice]:
    """Per group of ``prior``: the width in [pruned, parent] whose convolutions (the group's, its
    neighbours at their latest choice: :func:`~spade_deploy.hwaware.search_widths`) run fastest;
    the pruned width unless another is at least ``margin`` faster."""
    names = {m: n for n, m in prior.named_modules()}

    def decide(root: nn.Module, c: int, measure) -> tuple[int, GroupChoice]:
        top = parent.get(names[root], [0, c])[1]
        if top <= c:
            return c, GroupChoice(names[root], c, max(top, c), c)
        ms, _ = measure(range(c, top + 1))
        best = min(ms, key=lambda w: (ms[w], w))
        w = best if ms[best] < ms[c] * (1 - margin) else c
        return w, GroupChoice(names[root], c, top, w, dict(ms))

    return [rec for _, _, rec in search_widths(prior, trace, sized, ignored, timer, lambda c: c, decide, max_passes)]


_TIMERS: dict[str, DeviceTimer] = {}  # one per device: convolution timings cached for the process
_DECIDED: dict[tuple, WidthChoice] = {}  # architecture, device, size -> the choice (same widths, same choice)


def default_timer(device: str) -> DeviceTimer:
    dev = str(torch.device(device))
    if dev not in _TIMERS:
        _TIMERS[dev] = DeviceTimer(dev)
    return _TIMERS[dev]


def _exact(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        ref, out = a(x), b(x)
    return bool(ref.shape == out.shape and (out - ref).abs().max() <= EXACT_TOL * ref.abs().max().clamp_min(1e-30))


def deploy_widths(model: Reconstructor, device: str = "cpu", shape: tuple[int, int] | None = None, sample=None,
                  timer: Timer | None = None, margin: float = MARGIN, guard: float = GUARD_MARGIN) -> Reconstructor:
    """``model`` with every pruned prior padded to the widths measured fastest on ``device`` for
    images of ``shape`` (or those of ``sample = (y, physics)``), where that pays in an interleaved
    timing of the whole priors (the measured widths, the parent's widths and the pruned ones timed
    together; a padding kept only if at least ``guard`` faster than the pruned priors); else
    ``model`` itself. An unpruned model, or one whose parent widths are unknown, is returned as it
    is. The returned model (never the caller's) records the decision: ``deployed_widths``
    (``{prior: {group root: width}}``) and ``width_choice`` (:class:`WidthChoice`)."""
    if sample is not None:
        shape = tuple(sample[0].shape[-2:])
    parent = parent_widths(model)
    if shape is None or parent is None:
        return model
    priors = model.priors()
    current = {n: layer_shapes(p) for n, p in priors.items()}
    if all(current[n] == parent.get(n, current[n]) for n in priors):
        return model  # unpruned: nothing to pad
    size = tuple(int(s) for s in shape)
    timer = timer or default_timer(device)
    key = (model.registry_name, json.dumps(current, sort_keys=True), json.dumps(parent, sort_keys=True),
           getattr(timer, "device", str(device)), size, id(timer))
    choice = _DECIDED.get(key)
    if choice is not None:  # the same widths measured earlier in this process: the same decision
        if not choice.padded:
            return _recorded(copy.copy(model), choice)
        built, note = _padded(model, choice.candidates[choice.kept])
        return _recorded(built if built is not None else copy.copy(model), choice)
    cpu = copy.deepcopy(model).cpu().eval()
    groups = {name: _fastest(prior, cpu.prior_example_input(name, 64, 64), cpu.prior_example_input(name, *size),
                             cpu.prior_output_layers(name), parent.get(name, {}), timer, margin)
              for name, prior in cpu.priors().items()}
    choice = WidthChoice(getattr(timer, "device", str(device)), size, groups)
    _DECIDED[key] = choice
    pruned_w = {p: {g.layer: g.pruned for g in gs} for p, gs in groups.items()}
    for label, widths in (("measured", {p: {g.layer: g.fastest for g in gs} for p, gs in groups.items()}),
                          ("parent", {p: {g.layer: g.parent for g in gs} for p, gs in groups.items()})):
        if widths != pruned_w and widths not in choice.candidates.values():
            choice.candidates[label] = widths
    built = {}
    for label, widths in choice.candidates.items():
        built[label], note = _padded(model, widths)
        if built[label] is None:
            choice.note = note
            return _recorded(copy.copy(model), choice)
    if not built:
        choice.note = "every group at its parent's width already"
        return _recorded(copy.copy(model), choice)
    sec = timer.prior_seconds({"pruned": model, **built}, size)
    choice.prior_ms = {k: 1000 * v for k, v in sec.items()}
    best = min(built, key=lambda k: sec[k])
    if sec[best] < sec["pruned"] * (1 - guard):
        choice.kept = best
        choice.note = f"{best} widths faster than the pruned ones in an interleaved timing of the whole priors"
        return _recorded(built[best], choice)
    choice.note = "no padding faster than the pruned priors as a whole; deployed as pruned"
    return _recorded(copy.copy(model), choice)


def _padded(model: Reconstructor, widths: dict[str, dict[str, int]]) -> tuple[Reconstructor | None, str]:
    """A copy of ``model`` with its priors padded to ``widths`` and checked to compute the same
    outputs; ``(None, why)`` where a prior cannot be padded exactly."""
    padded = copy.deepcopy(model).eval()
    for name, prior in model.priors().items():
        want = widths.get(name, {})
        cpu_prior = copy.deepcopy(prior).cpu().eval()
        if all(want.get(layer, shape[1]) == shape[1] for layer, shape in layer_shapes(cpu_prior).items()):
            continue
        ignored = [dict(zip(prior.modules(), cpu_prior.modules()))[m] for m in model.prior_output_layers(name)]
        try:
            new = pad_prior(cpu_prior, model.prior_example_input(name, 64, 64), want, ignored)
        except PaddingUnsupported as exc:
            return None, f"{name}: not padded ({exc}); deployed as pruned"
        if not _exact(cpu_prior, new, model.prior_example_input(name, 32, 32)):
            return None, f"{name}: padding changed the output; deployed as pruned"
        padded.set_prior(name, new.to(next(prior.parameters()).device))
    return padded, ""


def _recorded(model: Reconstructor, choice: WidthChoice) -> Reconstructor:
    """``model`` (a copy, never the caller's) carrying the decision."""
    model.width_choice = choice
    model.deployed_widths = choice.widths
    return model


__all__ = ["pad_prior", "deploy_widths", "parent_widths", "PaddingUnsupported", "WidthChoice", "GroupChoice",
           "GUARD_MARGIN"]
