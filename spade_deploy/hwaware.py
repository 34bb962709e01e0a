"""Widths and latencies measured on the run device, for hardware-aware and latency-targeted pruning.

A pruned prior is only as much faster as its MACs if its kernels run the widths pruning leaves as
efficiently as the unpruned ones, and they often do not: on the 2-core CPU of
``benchmarks/results/conv-width-cpu.md`` 38- and 40-wide 3x3 convolutions run at 65-70 % of the
GMAC/s of 32- or 64-wide ones (onnxruntime), and the small DEQ's prior pruned at 0.4 ran its 19 of
32 filters about half as fast as when rounded to 16. So :func:`choose_widths` times the prior's own
convolutions (their kinds, strides and input sizes at the data's shape) at every width near the one
the ratio keeps and picks, per DepGraph group, the fastest of the widths with the best measured
time per useful MAC; where none of those runs faster than the group's whole width (a CPU whose
kernels run 19 of 32 filters slower than 32), the widths up to the whole one are candidates too, and
the group stays whole where no narrower width pays. What a pruned model deploys is decided again on
the deploying device (:mod:`spade_deploy.deploy.widths`: zero filters up to the widths it runs fastest).

Every timing is the median of a few repeats, interleaved across all the calls being compared (one
call of each per round), so drift and load hit all of them alike. A :class:`Timer` is injectable;
:class:`DeviceTimer` is the real one (PyTorch eager, channels-last as the priors run, CUDA
synchronised). It times PyTorch, not the deployed engine: exporting each candidate convolution to
onnxruntime would cost seconds per width, and on the CPU of ``conv-width-cpu.md`` both oneDNN and
onnxruntime's MLAS run the same widths slowly (38 and 40) and fast (32, 48, 64).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Protocol

import torch
import torch_pruning as tp
from torch import nn

from .errors import SpadeError
from .timing import interleaved_medians, sync_device

# A width may leave the paper-exact count by at most this fraction (down: 16 for the 19 of 32 the
# ratio 0.4 keeps; 32 for 38 of 64), and replaces it only if it runs a useful MAC at least
# ``MARGIN`` faster: where the measurement cannot tell them apart the paper's count stays.
TOLERANCE = 0.2
MARGIN = 0.05


@dataclass(frozen=True)
class ConvKind:
    """One convolution as the device sees it: its shape and the spatial size of its input."""

    in_ch: int
    out_ch: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    transposed: bool
    height: int
    width: int

    @property
    def macs(self) -> int:
        """Multiply-accumulates of one call on a single image."""
        if self.transposed:
            h, w = self.height, self.width  # every input pixel scatters a kernel
        else:
            h, w = (
                (size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, p, d, k, s in zip((self.height, self.width), self.padding, self.dilation, self.kernel, self.stride)
            )
        return int(h * w * self.out_ch * (self.in_ch // self.groups) * math.prod(self.kernel))

    def with_widths(self, in_ch: int | None = None, out_ch: int | None = None) -> "ConvKind":
        new_in = self.in_ch if in_ch is None else in_ch
        new_out = self.out_ch if out_ch is None else out_ch
        groups = self.groups
        if groups > 1 and groups == self.in_ch == self.out_ch:  # depthwise stays depthwise
            groups = new_in = new_out = in_ch or out_ch or self.in_ch
        return replace(self, in_ch=new_in, out_ch=new_out, groups=groups)

    def build(self) -> nn.Module:
        cls = nn.ConvTranspose2d if self.transposed else nn.Conv2d
        return cls(self.in_ch, self.out_ch, self.kernel, stride=self.stride, padding=self.padding,
                   dilation=self.dilation, groups=self.groups)

    def as_dict(self) -> dict:
        return {"in": self.in_ch, "out": self.out_ch, "kernel": list(self.kernel), "stride": list(self.stride),
                "input": [self.height, self.width], "transposed": self.transposed}


_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def conv_kinds(module: nn.Module, example: torch.Tensor) -> dict[nn.Module, ConvKind]:
    """Every convolution of ``module`` with the input size it sees on ``example`` (forward hooks)."""
    kinds: dict[nn.Module, ConvKind] = {}

    def hook(m, inputs, _out):
        h, w = inputs[0].shape[-2:]
        kinds[m] = ConvKind(m.in_channels, m.out_channels, tuple(m.kernel_size), tuple(m.stride), tuple(m.padding),
                            tuple(m.dilation), m.groups, isinstance(m, nn.ConvTranspose2d), int(h), int(w))

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, _CONVS)]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for handle in handles:
            handle.remove()
    return kinds


# ------------------------------------------------------------------------------------------------
class Timer(Protocol):
    """What the width choice and the latency search measure; inject one to test them."""

    device: str

    def conv_seconds(self, kinds: Iterable[ConvKind]) -> dict[ConvKind, float]:
        """Seconds per call of each convolution kind (batch 1)."""

    def prior_seconds(self, models: dict[str, nn.Module], size: tuple[int, int]) -> dict[str, float]:
        """Seconds per call of all of each reconstructor's priors on a ``size`` input, one pass each."""


@dataclass
class DeviceTimer:
    """PyTorch eager on ``device`` (channels-last, as the priors run), interleaved medians.

    Convolution timings are cached per kind, so a search re-measures only widths it has not seen.
    ``clock`` reads the time (seconds) before and after each call; tests inject one."""

    device: str = "cpu"
    repeats: int = 5
    warmup: int = 1
    cache: dict[ConvKind, float] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self):
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise SpadeError(f"unknown device {self.device!r}: cpu | cuda[:N]")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise SpadeError(f"--device {self.device}: no CUDA GPU is visible here")

    def _sync(self):
        sync_device(self.device)

    def _input(self, shape) -> torch.Tensor:
        return torch.randn(*shape, device=self.device).contiguous(memory_format=torch.channels_last)

    def conv_seconds(self, kinds: Iterable[ConvKind]) -> dict[ConvKind, float]:
        todo = [k for k in dict.fromkeys(kinds) if k not in self.cache]
        if todo:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                calls = {}
                for k in todo:
                    conv = k.build().to(self.device).eval().to(memory_format=torch.channels_last)
                    x = self._input((1, k.in_ch, k.height, k.width))
                    calls[k] = lambda conv=conv, x=x: conv(x)
                self.cache.update(interleaved_medians(calls, self.repeats, self.warmup, self._sync, self.clock))
        return {k: self.cache[k] for k in kinds}

    def prior_seconds(self, models: dict[str, nn.Module], size: tuple[int, int]) -> dict[str, float]:
        import copy

        calls = {}
        for label, model in models.items():
            model = copy.deepcopy(model).to(self.device).eval()
            pairs = [(prior, model.prior_example_input(name, *size).to(self.device).contiguous(memory_format=torch.channels_last))
                     for name, prior in model.priors().items()]
            calls[label] = lambda pairs=pairs: [prior(x) for prior, x in pairs]
        return interleaved_medians(calls, self.repeats, self.warmup, self._sync, self.clock)


# ------------------------------------------------------------------------------------------------
@dataclass
class GroupWidth:
    """One DepGraph group (channels pruned together) and the width chosen for it."""

    layers: list[str]  # the convolutions whose filters the group's channels are
    channels: int  # before pruning
    paper: int  # what the ratio keeps: int(channels * (1 - ratio))
    chosen: int
    ms: dict[int, float]  # measured time of the group's convolutions at each candidate width
    mmacs: dict[int, float]  # their MACs, millions

    def as_dict(self) -> dict:
        return {"layers": self.layers, "channels": self.channels, "paper": self.paper, "chosen": self.chosen,
                "ms": {str(w): round(t, 4) for w, t in self.ms.items()},
                "mmacs": {str(w): round(m, 3) for w, m in self.mmacs.items()}}


def prunable_groups(prior: nn.Module, example: torch.Tensor, ignored: list[nn.Module]):
    """``(root module, out layers, in layers, channels)`` per prunable group of ``prior``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        dg = tp.DependencyGraph().build_dependency(prior, example_inputs=example)
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.ConvTranspose2d)):
        outs, ins = [], []
        for dep, _ in group:
            m = dep.target.module
            if not isinstance(m, _CONVS):
                continue
            if dg.is_out_channel_pruning_fn(dep.handler) and m not in outs:
                outs.append(m)
            elif dg.is_in_channel_pruning_fn(dep.handler) and m not in ins:
                ins.append(m)
        root = group[0].dep.target.module
        channels = dg.get_out_channels(root)
        if outs and channels:
            yield root, outs, ins, int(channels)


def kept_channels(channels: int, ratio: float) -> int:
    """What torch-pruning keeps of ``channels`` at ``ratio`` (local pruning): the paper-exact count."""
    return max(int(channels * (1 - ratio)), 1)


def ratio_keeping(channels: int, kept: int) -> float:
    """The pruning ratio for which torch-pruning keeps exactly ``kept`` of ``channels``."""
    return 1.0 - (kept + 0.5) / channels


# decide(root, c, measure) -> (width, record): one group's choice, ``root`` its root layer, ``c`` its
# channel count in the prior searched, and
# ``measure(widths)`` the (ms, MMACs) per width of the group's convolutions at those widths, its
# neighbours at their latest choice (cumulative over calls for this group in this pass).
Decide = Callable[[nn.Module, int, Callable[[Iterable[int]], tuple[dict[int, float], dict[int, float]]]], tuple]


def search_widths(prior: nn.Module, trace_example: torch.Tensor, size_example: torch.Tensor,
                  ignored: list[nn.Module], timer: Timer, start: Callable[[int], int], decide: Decide,
                  max_passes: int = 4) -> list[tuple[nn.Module, list[nn.Module], object]]:
    """Per prunable group of ``prior``, ``(root, outs, record)`` of ``decide``'s choice (``outs``: the
    layers whose filters the group's channels are), coordinate-wise: a
    group's convolutions also depend on the widths of the groups they connect to (a block's inner
    convolutions read and write the residual trunk), so every group starts at ``start(c)`` (``c``:
    its channels in ``prior``) and the choice is repeated, each group with its neighbours at their
    latest choice, until no group changes (at most ``max_passes`` passes; timings are cached per
    kind by the timer). ``trace_example`` traces the dependency graph; ``size_example`` sets the
    input size the convolutions are timed at (the data's shape)."""
    kinds = conv_kinds(prior, size_example)
    groups = list(prunable_groups(prior, trace_example, ignored))
    out_w = {m: k.out_ch for m, k in kinds.items()}
    in_w = {m: k.in_ch for m, k in kinds.items()}
    current: dict[nn.Module, int] = {}

    def set_width(root, outs, ins, w: int) -> None:
        current[root] = w
        out_w.update({m: w for m in outs})
        in_w.update({m: w for m in ins})

    for root, outs, ins, c in groups:
        set_width(root, outs, ins, start(c))
    result: dict[nn.Module, object] = {}
    for _ in range(max_passes):
        changed = False
        for root, outs, ins, c in groups:
            layers = [m for m in dict.fromkeys([*outs, *ins]) if m in kinds]
            ms: dict[int, float] = {}
            mmacs: dict[int, float] = {}

            def measure(widths: Iterable[int]) -> tuple[dict[int, float], dict[int, float]]:
                per_w = {w: [kinds[m].with_widths(in_ch=w if m in ins else in_w[m], out_ch=w if m in outs else out_w[m])
                             for m in layers] for w in widths if w not in ms}
                seconds = timer.conv_seconds([kd for ks in per_w.values() for kd in ks])
                ms.update({w: 1000 * sum(seconds[kd] for kd in ks) for w, ks in per_w.items()})
                mmacs.update({w: sum(kd.macs for kd in ks) / 1e6 for w, ks in per_w.items()})
                return ms, mmacs

            w, result[root] = decide(root, c, measure)
            if w != current[root]:
                changed = True
                set_width(root, outs, ins, w)
        if not changed:
            break
    return [(root, outs, result[root]) for root, outs, *_ in groups]


def choose_widths(
    prior: nn.Module,
    trace_example: torch.Tensor,
    size_example: torch.Tensor,
    ratio: float,
    ignored: list[nn.Module],
    timer: Timer,
    tolerance: float = TOLERANCE,
    margin: float = MARGIN,
    max_passes: int = 4,
) -> list[tuple[nn.Module, GroupWidth]]:
    """Per prunable group of ``prior``, the width to keep: among widths within ``tolerance`` of the
    paper-exact count ``k`` (and at most the group's channels) and no slower than ``k`` in all,
    those within ``margin`` of the least measured time per useful MAC of the group's convolutions,
    and of those the fastest in all; ``k`` itself unless the best time per MAC is at least
    ``margin`` better than ``k``'s (so noise does not move it). That width must also pay against
    the group's whole width ``c`` (the parent's): at least ``margin`` faster than ``c``. Where it
    does not (a CPU whose kernels run 19 or 26 of 32 filters slower than all 32), the candidates
    extend up to ``c``: the fastest width at least ``margin`` faster than ``c``, else ``c`` itself,
    the group kept whole (the ratio buys nothing there). Per MAC alone, a width as efficient
    as a narrower one but slower in all would win on noise (USRNet's 19 of 32 filters: 16 and 22
    ran a MAC equally fast, 22 by 0.3 %, and 22 took 2.40 ms where 16 took 1.75). Groups are
    chosen coordinate-wise from the paper's counts (:func:`search_widths`)."""
    names = {m: n for n, m in prior.named_modules()}

    def widths_near(k: int, c: int) -> range:
        lo, hi = max(1, math.ceil(k * (1 - tolerance))), min(c, math.floor(k * (1 + tolerance)))
        return range(min(lo, k), max(hi, k) + 1)

    def decide(_root, c: int, measure) -> tuple[int, tuple]:
        k = kept_channels(c, ratio)
        near = widths_near(k, c)
        ms, mmacs = measure([*near, c])
        # never slower than the paper's count: at small spatial sizes a wider layer can cost less
        # per MAC (fixed per-call costs) and more in all (USRNet's 96-pixel tiles: 19 -> 22)
        per_mac = {w: ms[w] / mmacs[w] for w in near if mmacs[w] > 0 and ms[w] <= ms.get(k, math.inf)}
        best = min(per_mac.values()) if per_mac else None
        w_best = k
        if best is not None and best < per_mac.get(k, math.inf) * (1 - margin):
            # of the widths as efficient as the best (within the margin), the fastest in all
            w_best = min((w for w, v in per_mac.items() if v <= best * (1 + margin)), key=lambda w: (ms[w], -w))
        if not ms[w_best] <= ms[c] * (1 - margin):
            # No width near the paper's pays against the whole group here: look up to c.
            ms, mmacs = measure(range(min(ms), c + 1))
            paying = [w for w in ms if ms[w] <= ms[c] * (1 - margin)]
            w_best = min(paying, key=lambda w: (ms[w], -w)) if paying else c
        return w_best, (c, k, w_best, dict(ms), dict(mmacs))

    found = search_widths(prior, trace_example, size_example, ignored, timer, lambda c: kept_channels(c, ratio), decide,
                          max_passes)
    return [(root, GroupWidth([names[m] for m in outs], *rec)) for root, outs, rec in found]


def keeps_whole(groups: Iterable[GroupWidth]) -> bool:
    """Every group kept at its whole width: a ratio that buys nothing on the measuring device."""
    groups = list(groups)
    return bool(groups) and all(g.chosen >= g.channels for g in groups)
