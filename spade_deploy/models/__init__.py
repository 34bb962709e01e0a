"""Registry of reconstructors: a name -> :class:`ModelEntry` (config dataclass, builder, presets,
the task it solves, its importer of official checkpoints, its demo recipe, its bundled weights).

A reconstructor is an ``nn.Module`` called as ``model(y, physics) -> x`` and exposing its prunable
CNN priors by name through :meth:`Reconstructor.priors`; a prior is ``prior(x) -> x`` on real
tensors ``(B, C, H, W)``. The outer loop never knows what a prior is made of. A fixed-point model
(:class:`FixedPointReconstructor`) adds its solver's stopping rule and what the last solve did.
Models register themselves from their task's package (:mod:`spade_deploy.plugins`).

A checkpoint stores the registry name and the config; a pruned checkpoint additionally stores
the shape of every convolution, and :func:`adapt_widths` rebuilds the pruned architecture from
the dense one before the tensors are loaded (no pickled modules anywhere).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from pathlib import Path

import torch
from torch import nn

from ..errors import SpadeError
from ..io import read_manifest
from ..paths import memory_bytes
from ..plugins import load_task_packages
from ..solvers import PrecisionSchedule, SolveInfo, SolverConfig


class Reconstructor(nn.Module):
    """Base class: ``forward(y, physics) -> x``; priors are the prunable sub-networks.

    What a fixed-point model adds (:class:`FixedPointReconstructor`) is declared here with the
    defaults of a model without a solver, so no caller asks a model what it has."""

    registry_name: str = ""
    # The imaging task the model solves (spade_deploy.tasks: its data, physics, metrics, baseline):
    # its ModelEntry's, set by build_model.
    task: str
    # The stopping rule of the model's solver (fixed-point models); None: a fixed number of steps.
    solver_cfg: SolverConfig | None = None
    # The image the model is trained and scored against, in its task's terms. MRI: "sense" =
    # |S^H F^-1 k| (a coil-combined estimate, as the DEQ produces), "rss" = fastMRI's
    # reconstruction_rss; SR: "hr" = the high-resolution image.
    reference: str = "sense"
    # What runs the priors (a deployment sets them; the model as built: eager PyTorch, FP32).
    engine_label: str = "eager NCHW fp32"
    precision: str = "fp32"  # "fp32", or a precision schedule such as "bf16->fp32 @ 0.005"

    def priors(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def set_prior(self, name: str, module: nn.Module) -> None:
        """Replace one prior (pruning, deployment back-ends)."""
        raise NotImplementedError

    def prunable(self) -> dict[str, nn.Module]:
        """The sub-networks SPADE prunes, each on its own: the priors, plus any a model prunes but
        keeps in PyTorch (never exported nor swapped; USRNet's hyper-parameter MLP). Default: the
        priors. ``set_prior``, ``prior_example_input`` and ``prior_output_layers`` accept every name."""
        return self.priors()

    def prior_example_input(self, name: str, height: int = 64, width: int = 64) -> torch.Tensor:
        """A real-valued example input for tracing one prior on its own."""
        raise NotImplementedError

    def measurement_operator(self, y: torch.Tensor, physics):
        """The forward operator this model assumes for measurements ``y``: ``physics`` itself, or
        for models that estimate their own coil maps (E2E-VarNet) the same mask with those maps.
        Self-supervised fine-tuning rotates it for its equivariance term."""
        return physics

    def predicted_measurements(self, x: torch.Tensor, y: torch.Tensor, physics) -> torch.Tensor:
        """The measurements this model predicts for ``y``, given its output ``x = self(y, physics)``:
        the data-fidelity term ``A f(y)`` of self-supervised fine-tuning. Default: the model's
        operator applied to its image. Models whose native output is k-space (VarNet) override it."""
        return self.measurement_operator(y, physics).A(x)

    def supervised_pair(self, x_net: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """What supervised training compares: ``(output, reference)``. Default: the output and the
        batch's ``x_gt``."""
        return x_net, batch.x_gt

    def distillation_pair(self, x_net: torch.Tensor, teacher_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What school fine-tuning compares: ``(student output, teacher output)``. Default: both whole."""
        return x_net, teacher_out

    def contraction_norms(self, batch, x_net: torch.Tensor) -> torch.Tensor | None:
        """Per sample, the norm of the Jacobian of the model's iteration at its output ``x_net`` (the
        rate of a fixed-point model's solver); ``None`` for models that are not fixed points."""
        return None

    def solve_info(self) -> SolveInfo | None:
        """What the last forward's solver did per sample (iterations, residuals, convergence);
        None for models without a solver."""
        return None

    # -- training: ``options`` is the model's own training options (its ModelEntry.train_options,
    # TrainConfig.model_options; None for models without any) --------------------------------
    def pretraining(self, options: Any) -> tuple[int, float]:
        """The steps and learning rate of the model's pretraining stage (:meth:`pretrain_loss`)
        before end-to-end training; ``(0, 0.0)``: none."""
        return 0, 0.0

    def start_training(self, options: Any) -> None:
        """Set up end-to-end training (a fixed-point model: its training solver)."""

    def training_penalty(self, batch, x_net: torch.Tensor, options: Any, step: int,
                         slot: tuple[int, int] | None = None) -> torch.Tensor | None:
        """A weighted penalty added to the loss of training step ``step`` at the output ``x_net``;
        None: none. ``slot = (position, size)``: ``batch`` is the sample at that position of a
        global batch of ``size`` (the trainer backpropagates each sample alone); None: ``batch``
        is the whole batch."""
        return None

    def pretrain_loss(self, batch) -> torch.Tensor:
        """The loss of the model's pretraining stage (where :meth:`pretraining` has steps)."""
        raise NotImplementedError(f"{type(self).__name__} has no pretraining stage")

    def regularizer(self, batch, x_net: torch.Tensor, target: float, on: str = "operator",
                    samples: list[int] | None = None) -> torch.Tensor | None:
        """A penalty keeping the model's iteration contractive at its output ``x_net`` (a norm
        above ``target``); None for models without one."""
        return None

    def prior_output_layers(self, name: str) -> list[nn.Module]:
        """The convolutions producing a prior's output: never pruned (they are its interface).
        Default: the prior's ``tail`` attribute, else its last convolution in registration order."""
        prior = self.priors()[name]
        convs = [m for m in prior.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        if not convs:
            raise SpadeError(f"prior {name!r} has no convolution to prune")
        return [getattr(prior, "tail", None) or convs[-1]]


class FixedPointReconstructor(Reconstructor):
    """A reconstructor whose output is the fixed point of an iteration, found by
    :func:`spade_deploy.solvers.solve` under :attr:`solver_cfg` (``forward(y, physics, solver=None)``
    takes another stopping rule for one call), reporting each solve in :meth:`solve_info`.

    A deployment with a precision schedule (:class:`~spade_deploy.solvers.PrecisionSchedule`) sets
    :attr:`precision_schedule`: every solve of this model then runs it, whatever stopping rule
    the call gives (its priors switch precision on the solver's word,
    :class:`~spade_deploy.deploy.priors.PrecisionPrior`)."""

    precision_schedule: PrecisionSchedule | None = None

    def __init__(self, solver_cfg: SolverConfig):
        super().__init__()
        self.solver_cfg = solver_cfg
        # The stopping rule of training-mode forward passes (the trainer sets a looser one).
        self.train_solver_cfg: SolverConfig | None = None
        self._solve_info: SolveInfo | None = None

    def solver_for(self, given: SolverConfig | None = None) -> SolverConfig:
        """The stopping rule of this call: ``given``, else the training one in training mode, else
        :attr:`solver_cfg`; with this model's :attr:`precision_schedule` where the rule has none."""
        if given is None:
            given = self.train_solver_cfg if self.training and self.train_solver_cfg else self.solver_cfg
        if self.precision_schedule is not None and given.precision is None:
            given = dataclasses.replace(given, precision=self.precision_schedule)
        return given

    def solve_info(self) -> SolveInfo | None:
        return self._solve_info

    def set_train_solver(self, max_iter: int, tol: float) -> None:
        self.train_solver_cfg = dataclasses.replace(self.solver_cfg, max_iter=max_iter, tol=tol)


@dataclass(frozen=True)
class DemoRecipe:
    """What ``spade demo`` runs for one architecture on the embedded data (README: the demo):
    :class:`~spade_deploy.train.TrainConfig` s of the base and of each fine-tuning strategy."""

    preset: str
    train: Any  # TrainConfig
    finetune: dict[str, Any]  # strategy -> TrainConfig
    task_options: dict = field(default_factory=dict)  # the task's options (Task.from_cli), its defaults otherwise
    ratios: tuple[float, ...] | None = None  # pruning ratios (None: the paper's 0.05 0.1 0.2 0.4)
    # Also prune to the widths measured fastest here (--round-to auto), at ``hardware_ratios``
    # (None: every ratio); those that buy nothing on this device are not fine-tuned.
    hardware_widths: bool = True
    hardware_ratios: tuple[float, ...] | None = None
    # The bench also scores the models pruned at the largest ratio before fine-tuning (not timed).
    score_unfinetuned: bool = True


# An importer reads an official checkpoint into the model: (path, registry name, the preset's
# config to match or None) -> (model, what the manifest records of the source, a one-line summary).
Importer = Callable[[Path, str, Any], "tuple[Reconstructor, dict, str]"]

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"


@dataclass(frozen=True)
class ModelEntry:
    """Everything the toolchain knows about one architecture."""

    name: str
    config_cls: type
    builder: Callable[[Any], Reconstructor]
    presets: dict[str, Any]
    default_preset: str
    task: str  # the task it solves (spade_deploy.tasks)
    importer: Importer | None = None  # official checkpoints (`spade import`)
    demo: DemoRecipe | None = None  # what `spade demo` runs for it
    # Training options only this model takes (a frozen dataclass whose defaults are the model's
    # own; TrainConfig.model_options holds one, a run's train_config records its fields flat).
    train_options: type | None = None

    def bundled_path(self, preset: str) -> Path:
        """Where the package ships the base model of ``preset`` trained on the embedded data."""
        return WEIGHTS_DIR / f"{self.name}-{preset}.safetensors"

    def bundled_base(self, preset: str, key: dict | None) -> Path | None:
        """The shipped base model of ``preset`` if it was trained on the data identified by ``key``
        (:meth:`spade_deploy.tasks.Task.dataset_key`; None: a user's data, never). The base models
        in ``spade_deploy/weights/`` were made by ``spade demo --retrain`` (the entry's demo
        recipe) and record the data they were trained on."""
        path = self.bundled_path(preset)
        if key is None or not path.is_file():
            return None
        manifest = read_manifest(path)
        return path if manifest.get("dataset") == key and manifest.get("preset") == preset else None


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, config_cls: type, presets: dict[str, Any], default_preset: str, task: str,
                   importer: Importer | None = None, demo: DemoRecipe | None = None,
                   train_options: type | None = None):
    """Register the builder it decorates as model ``name`` (see :class:`ModelEntry`)."""
    def deco(builder: Callable[[Any], Reconstructor]):
        _REGISTRY[name] = ModelEntry(name, config_cls, builder, presets, default_preset, task, importer, demo,
                                     train_options)
        return builder

    return deco


def model_names() -> list[str]:
    load_task_packages()
    return sorted(_REGISTRY)


def bundled_path(model: str, preset: str) -> Path:
    return get_entry(model).bundled_path(preset)


def bundled_base(model: str, preset: str, key: dict | None) -> Path | None:
    return get_entry(model).bundled_base(preset, key)


def get_entry(name: str) -> ModelEntry:
    load_task_packages()
    if name not in _REGISTRY:
        raise SpadeError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def preset_config(name: str, preset: str | None = None, **overrides: Any):
    entry = get_entry(name)
    preset = preset or entry.default_preset
    if preset not in entry.presets:
        raise SpadeError(
            f"unknown preset {preset!r} for model {name!r}; choose one of: {', '.join(entry.presets)}"
        )
    cfg = entry.presets[preset]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def build_model(name: str, config: Any = None, preset: str | None = None) -> Reconstructor:
    """The registered architecture ``name``. A ``config`` given as a dict (a checkpoint's manifest)
    is validated first: field types and ranges, then its parameter count on the meta device
    (nothing allocated), so a tampered file cannot make this allocate more than the machine has."""
    entry = get_entry(name)
    if config is None:
        config = preset_config(name, preset)
    elif isinstance(config, dict) or not isinstance(config, entry.config_cls):
        config = config_from_dict(entry.config_cls, config)
        check_size(_build(entry, config, meta=True), f"{name} config")
    model = _build(entry, config)
    model.registry_name = name
    model.task = entry.task
    model.config = config
    return model


def _build(entry: ModelEntry, config: Any, meta: bool = False) -> Reconstructor:
    try:
        if meta:
            with torch.device("meta"):
                return entry.builder(config)
        return entry.builder(config)
    except SpadeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a validated but inconsistent config (a builder's assertion)
        raise SpadeError(f"cannot build a {entry.name!r} from config {dataclasses.asdict(config)}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


# Config fields are counts, widths and iteration caps: every int field lies in [1, INT_MAX].
INT_MAX = 10_000
FLOAT_MAX = 1e6


def _check_value(where: str, hint: Any, value: Any) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return
        hint = next((a for a in args if a is not type(None)), hint)
    if origin in (tuple, list):  # e.g. USRNet's widths per level, a JSON list in the manifest
        args = [a for a in typing.get_args(hint) if a is not Ellipsis] or [Any]
        if not isinstance(value, (list, tuple)) or not 0 < len(value) <= 64:
            raise SpadeError(f"{where} must be a list of at most 64 values, got {type(value).__name__} {str(value)[:40]!r}")
        for i, v in enumerate(value):
            _check_value(f"{where}[{i}]", args[0], v)
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and not 1 <= value <= INT_MAX:
            raise SpadeError(f"{where} = {value} is out of range [1, {INT_MAX}]")
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not (math.isfinite(value) and abs(value) <= FLOAT_MAX):
            raise SpadeError(f"{where} = {value} is not a finite number of magnitude <= {FLOAT_MAX:g}")
    elif hint is str:
        ok = isinstance(value, str) and 0 < len(value) <= 100
    else:
        ok = isinstance(value, (bool, int, float, str)) or value is None
    if not ok:
        expected = getattr(hint, "__name__", str(hint))
        raise SpadeError(f"{where} must be {expected}, got {type(value).__name__} {str(value)[:40]!r}")


def config_from_dict(cls: type, data: Any) -> Any:
    """A config dataclass from a manifest's JSON, every field checked against its annotation."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise SpadeError(f"config for {cls.__name__} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise SpadeError(f"config for {cls.__name__} has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        _check_value(f"config field {cls.__name__}.{key}", hints[key], value)
    data = {k: tuple(v) if typing.get_origin(hints[k]) is tuple else v for k, v in data.items()}
    try:
        config = cls(**data)  # a config's own checks (e.g. a DEQ's solver limits) run here
    except SpadeError as exc:
        raise SpadeError(f"config for {cls.__name__}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise SpadeError(f"config for {cls.__name__} is invalid: {exc}") from None
    return config


# A generous cap on a checkpoint's parameter count whatever the machine (the paper-size models
# have 1 M (DEQ) and 20 M (VarNet)): 10^9 float32 parameters are 4 GiB.
MAX_PARAMETERS = 1_000_000_000


def max_parameters() -> int:
    """The largest model a checkpoint may describe: float32 weights within a quarter of this
    machine's memory (held several times over: model, state dict, Adam moments), at most
    :data:`MAX_PARAMETERS`."""
    return min(memory_bytes() // 16, MAX_PARAMETERS)


def check_size(model: nn.Module, what: str) -> None:
    n = count_parameters(model)
    if n > max_parameters():
        raise SpadeError(f"{what} describes {n:,} parameters ({4 * n / 2**30:,.1f} GiB), more than this machine "
                         f"can hold (limit {max_parameters():,})")


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Pruned architectures: a shape manifest + plain tensors, rebuilt by adapting the dense model.
# --------------------------------------------------------------------------------------------

_ADAPTABLE = (nn.Conv2d, nn.ConvTranspose2d)


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{module_name: [in_channels, out_channels]}`` for every convolution."""
    return {
        n: [m.in_channels, m.out_channels] for n, m in model.named_modules() if isinstance(m, _ADAPTABLE)
    }


def adapt_widths(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Replace convolutions (and the norms that follow their width) by ones of the recorded widths.

    ``shapes`` comes from a file: it must map this architecture's convolution names to two widths
    in ``[1, INT_MAX]``, else a one-line :class:`SpadeError` (the caller bounds the total size)."""
    if not isinstance(shapes, dict):
        raise SpadeError(f"checkpoint layer shapes must be a JSON object, got {type(shapes).__name__}")
    modules = dict(model.named_modules())
    for name, widths in shapes.items():
        if (not isinstance(widths, (list, tuple)) or len(widths) != 2
                or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w <= INT_MAX for w in widths)):
            raise SpadeError(f"checkpoint layer shape of {name!r} must be two widths in [1, {INT_MAX}], "
                             f"got {str(widths)[:40]!r}")
        cin, cout = widths
        old = modules.get(name)
        if not isinstance(old, _ADAPTABLE):
            raise SpadeError(f"checkpoint names layer {name!r}, which this architecture does not have")
        if old.groups != 1 and (cin % old.groups or cout % old.groups):
            raise SpadeError(f"checkpoint layer {name!r}: widths {cin}, {cout} are not divisible by its {old.groups} groups")
        if (old.in_channels, old.out_channels) == (cin, cout):
            continue
        kwargs = dict(
            kernel_size=old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            groups=old.groups,
            bias=old.bias is not None,
            padding_mode=old.padding_mode,
        )
        if isinstance(old, nn.ConvTranspose2d):
            kwargs.pop("padding_mode")
            kwargs["output_padding"] = old.output_padding
        new = type(old)(cin, cout, **kwargs)
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, new)
    _sync_norm_widths(model)
    return model


def _sync_norm_widths(model: nn.Module) -> None:
    """Norms without parameters or running statistics (VarNet's InstanceNorm) hold their width only
    in ``num_features``; keep it equal to the output width of the convolution before them in the
    same ``nn.Sequential``, as torch-pruning does (else every forward warns of a mismatch)."""
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        width = None
        for m in seq:
            if isinstance(m, _ADAPTABLE):
                width = m.out_channels
            elif (isinstance(m, nn.modules.batchnorm._NormBase) and width is not None
                  and not m.affine and not m.track_running_stats):
                m.num_features = width


def load_state(model: nn.Module, state: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Strict load with a one-line error naming the first mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise SpadeError(f"{where} does not match the architecture ({detail}; {len(missing)} missing, {len(extra)} unexpected)")
    for k, v in own.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise SpadeError(
                f"{where} does not match the architecture: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
            )
    model.load_state_dict(state, strict=True)
