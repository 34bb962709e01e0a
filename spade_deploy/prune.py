"""SPADE structured pruning (section 3 of the paper) on top of Torch-Pruning's DepGraph.

Each prior is pruned on its own, traced on its own real-valued example input: DepGraph groups the
coupled layers (a residual trunk is one group), every group is ranked by the group L1 norm of eq. (6)
— for channel ``k``, the mean over the group's ``M`` layers of ``||w_k^i||_1`` — and the
``ratio`` least important channels of every group are removed (local, not global, pruning).
Output convolutions are never pruned, so priors keep their 2-channel interface.

Importance: ``GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)`` is eq. (6)
exactly (per-layer L1 norms of each channel's filters, averaged over the group, no normalisation).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn

from .checkpoint import load_model, save_model
from .errors import SpadeError
from .models import Reconstructor, count_parameters, layer_shapes

PAPER_RATIOS = (0.05, 0.1, 0.2, 0.4)


@dataclass
class PriorReport:
    name: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    widths: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class PruneReport:
    ratio: float
    round_to: int | None
    params_before: int
    params_after: int
    priors: list[PriorReport]
    example_size: tuple[int, int]

    @property
    def macs_before(self) -> int:
        return sum(p.macs_before for p in self.priors)

    @property
    def macs_after(self) -> int:
        return sum(p.macs_after for p in self.priors)


def check_ratio(ratio: float) -> float:
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) < 1.0):
        raise SpadeError(f"pruning ratio must lie strictly between 0 and 1, got {ratio}")
    return float(ratio)


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    macs, _ = tp.utils.count_ops_and_params(module, example)
    return int(macs)


def prune_model(
    model: Reconstructor, ratio: float, round_to: int | None = None, example_size: tuple[int, int] = (64, 64)
) -> tuple[Reconstructor, PruneReport]:
    """Return a pruned deep copy of ``model`` and what changed."""
    ratio = check_ratio(ratio)
    if round_to is not None and round_to < 1:
        raise SpadeError(f"--round-to must be a positive integer, got {round_to}")
    pruned = copy.deepcopy(model).eval()
    params_before = count_parameters(model)
    reports = []
    for name, prior in pruned.prunable().items():
        example = pruned.prior_example_input(name, *example_size)
        before = (count_parameters(prior), count_macs(prior, example))
        with torch.no_grad():
            shape = prior(example).shape  # a prior may change the channel count (USRNet: 4 -> 3)
        importance = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
        with warnings.catch_warnings():
            # 0-d learnable scalars (the EDSR residual scale) have no channel dimension to prune.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            pruner = tp.pruner.MetaPruner(
                prior,
                example,
                importance=importance,
                pruning_ratio=ratio,
                global_pruning=False,
                ignored_layers=pruned.prior_output_layers(name),
                round_to=round_to,
            )
            pruner.step()
        with torch.no_grad():
            out = prior(example)
        if out.shape != shape:
            raise SpadeError(f"prior {name!r} changed its output shape after pruning: {tuple(out.shape)}")
        pruned.set_prior(name, prior)
        reports.append(PriorReport(name, before[0], count_parameters(prior), before[1], count_macs(prior, example),
                                   {k: v for k, v in layer_shapes(prior).items()}))
    report = PruneReport(ratio, round_to, params_before, count_parameters(pruned), reports, tuple(example_size))
    return pruned, report


def prune_checkpoint(
    src: str | Path, ratios: list[float], out_dir: str | Path, round_to: int | None = None
) -> list[tuple[Path, PruneReport]]:
    """Prune a checkpoint at each ratio; write ``<out_dir>/<stem>.pruned-<ratio>.safetensors``."""
    ratios = [check_ratio(r) for r in ratios]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpadeError(f"output path {out} is a file, expected a folder")
    model, manifest = load_model(src)
    if manifest.get("pruning"):
        raise SpadeError(f"{src} is already pruned; prune the unpruned model")
    results = []
    for ratio in ratios:
        pruned, report = prune_model(model, ratio, round_to)
        path = out / f"{Path(src).stem}.pruned-{ratio:g}.safetensors"
        save_model(path, pruned, pruning={
            "ratio": ratio, "round_to": round_to, "parent": str(src),
            "params_before": report.params_before, "params_after": report.params_after,
            "macs_before": report.macs_before, "macs_after": report.macs_after,
        }, train_config=manifest.get("train_config"))
        results.append((path, report))
    return results
