"""One trainer for training and every fine-tuning strategy, and the evaluation used by all commands.

``fit`` runs Adam over a :class:`~spade_deploy.losses.Loss`; after each epoch it validates,
keeps the best checkpoint and atomically writes a resumable ``last.safetensors`` (model, Adam
state, epoch, history), and within an epoch every ``checkpoint_seconds`` (with the step), so a
kill loses at most that much work and a resumed run ends tensor-identical. Every random draw of a
step comes from (seed, epoch, step, sample), so the run is the same on one process or on several
started by torchrun (:mod:`spade_deploy.distributed`), and resumes on any number of them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import distributed
from .checkpoint import TRAIN_STATE_PREFIX as _OPTIM_PREFIX, check_finite, model_manifest
from .device import model_device, on_model_device
from .errors import SpadeError
from .io import atomic_path, load_checkpoint, remove_stale_temps, save_checkpoint
from .losses import Loss, remove_dead_teacher_folders
from .models import Reconstructor, get_entry, load_state
from .solvers import SolverConfig
from .tasks import Scores, SeededReads, Task, task_for


LR_SCHEDULES = ("constant", "cosine")
RELATIVE_TO = ("reference", "baseline")


def scheduled_lr(cfg: "TrainConfig", done: int, total: int) -> float:
    """The learning rate of the step after ``done`` of ``total`` steps (:attr:`TrainConfig.lr_schedule`)."""
    if cfg.lr_schedule == "constant" or total <= 0:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(done, total) / total))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    # "constant", or "cosine": each step's rate is lr * (1 + cos(pi t / T)) / 2, t the steps done, T
    # all the run's steps (a function of the step alone, so a resumed run continues it exactly).
    lr_schedule: str = "constant"
    # Supervised training divides each sample's squared error by the reference's squared norm
    # ("reference", scale-free across samples) or by the squared error of the task's naive
    # reconstruction ("baseline": Task.baseline_error), so each sample counts by its gain over
    # that baseline and those where the baseline is already good weigh as much as the others.
    relative_to: str = "reference"
    batch_size: int = 4
    seed: int = 0
    grad_clip: float = 1.0
    max_steps_per_epoch: int | None = None
    # Validate after every ``val_every``-th epoch and after the last; the best checkpoint is the
    # best of the validated epochs. ``validate=False``: never (the best checkpoint is the last
    # epoch, as a single validation after it would choose).
    val_every: int = 1
    validate: bool = True
    fixed_masks: bool = False  # school / self-supervised: the test measurements as acquired
    # The options only the trained model takes: an instance of its ModelEntry.train_options (the
    # DEQ's training solver, pretraining and convergence penalty: spade_deploy.mri.deq.DEQTrainOptions);
    # None: that class's defaults. Models without such options ignore it.
    model_options: Any = None
    # Where to train: "cpu", "cuda" (under torchrun each process's own GPU, cuda:LOCAL_RANK) or
    # "cuda:N"; None: where the model already is. Not part of the recipe (record()): a run may
    # resume elsewhere.
    device: str | None = None

    def __post_init__(self):
        if self.lr_schedule not in LR_SCHEDULES:
            raise SpadeError(f"lr_schedule must be one of {' | '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.relative_to not in RELATIVE_TO:
            raise SpadeError(f"relative_to must be one of {' | '.join(RELATIVE_TO)}, got {self.relative_to!r}")
        if not isinstance(self.validate, bool):
            raise SpadeError(f"validate must be true or false, got {self.validate!r}")
        ints = (("epochs", self.epochs, 1, 100_000), ("batch_size", self.batch_size, 1, 4096),
                ("seed", self.seed, 0, 2**31 - 1), ("max_steps_per_epoch", self.max_steps_per_epoch, 1, 10**9),
                ("val_every", self.val_every, 1, 100_000))
        for name, value, lo, hi in ints:
            if name == "max_steps_per_epoch" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise SpadeError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")
        # (name, value, low, high, low included)
        for name, value, lo, hi, closed in (("lr", self.lr, 0.0, 10.0, False), ("grad_clip", self.grad_clip, 0.0, 1e6, True)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not (lo <= value if closed else lo < value) or not value <= hi:
                raise SpadeError(f"{name} must be a finite number in {'[' if closed else '('}{lo:g}, {hi:g}], got {value!r}")

    def record(self) -> dict:
        """What a run records as its ``train_config``: the shared fields and the model's options, flat."""
        shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_RECORDED}
        return {**shared, **(dataclasses.asdict(self.model_options) if self.model_options is not None else {})}

    def for_model(self, name: str) -> "TrainConfig":
        """This config as it trains the registered model ``name``: :attr:`model_options` an instance
        of the model's ``train_options`` (its defaults when not given), None for models without any."""
        cls = get_entry(name).train_options
        if cls is None:
            return dataclasses.replace(self, model_options=None) if self.model_options is not None else self
        if self.model_options is None:
            return dataclasses.replace(self, model_options=cls())
        if not isinstance(self.model_options, cls):
            raise SpadeError(f"model {name!r} takes {cls.__name__} training options, "
                             f"not {type(self.model_options).__name__}")
        return self


_NOT_RECORDED = ("model_options", "device")


def recorded_config(stored: dict | None, cfg: TrainConfig) -> dict | None:
    """A run's recorded ``train_config`` as the fields :meth:`TrainConfig.record` writes for
    ``cfg`` (its shared fields and its model's options): runs of earlier versions also recorded
    their task's options there (:meth:`Task.recorded_options` reads those) and every model's
    options, which are no part of this recipe, and lack the fields added since, which read as
    their defaults."""
    if not isinstance(stored, dict):
        return None
    options = cfg.model_options
    defaults = TrainConfig(model_options=type(options)() if options is not None else None).record()
    return {**defaults, **{k: v for k, v in stored.items() if k in defaults}}


@dataclass
class FitResult:
    best_path: Path
    last_path: Path
    best_val_psnr: float
    history: list[dict]


# ------------------------------------------------------------------------------------------------
def evaluate(
    model: Reconstructor,
    dataset: Dataset,
    task: Task | None = None,
    solver: SolverConfig | None = None,
    batch_size: int = 4,
    on_batch: Callable[[int, int], None] | None = None,
) -> Scores:
    """The scores of ``model`` on ``dataset`` as its task defines them (:meth:`Task.evaluate`;
    ``task``: the model's own with its default options when not given)."""
    task = task if task is not None else task_for(model)
    return task.evaluate(model, dataset, solver=solver, batch_size=batch_size, on_batch=on_batch)


# ------------------------------------------------------------------------------------------------
# The denoiser pretraining's own Adam state, in a checkpoint written during pretraining.
_PRETRAIN_PREFIX = f"{_OPTIM_PREFIX}pretrain."


def _optim_tensors(opt: torch.optim.Optimizer, prefix: str = _OPTIM_PREFIX) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optim(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict,
                   prefix: str = _OPTIM_PREFIX) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key[len(prefix) :].split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _shares(task: Task, ds: Dataset, batches: list[list[int]], ctx: distributed.Context, seed: int):
    """For each global batch of ``batches``: its sample indices and this rank's share of it, as
    ``[(sample index, its items collated alone)]``, read by ``task.workers`` loader processes."""
    mine = [distributed.share(b, ctx.rank, ctx.world) for b in batches]
    # Its own generator: a loader without one would draw its base seed from torch's global RNG.
    loader = DataLoader(SeededReads(ds, seed), batch_sampler=[[i] for m in mine for i in m], collate_fn=task.collate,
                        num_workers=task.workers, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    for b, m in zip(batches, mine):
        yield b, [(i, next(it)) for i in m]


def _accumulate(units: list, n: int, compute: Callable[[int, Any], tuple[torch.Tensor, torch.Tensor]],
                seed: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Backpropagate each sample of this rank's share alone, its loss divided by ``n`` (the global
    batch's size), its random draws from ``seed + (sample index,)``. ``compute(index, items)``
    gives ``(loss, loss + penalty)``. Returns ``[sum of losses, sum of totals, non-finite totals]``
    (a sample whose total is not finite is not backpropagated)."""
    stats = torch.zeros(3, dtype=torch.float64)
    for i, items in units:
        distributed.seed_sample(*seed, i)
        value, total = compute(i, items)
        t = float(total.detach())
        if math.isfinite(t):
            (total / n).backward()
        else:
            stats[2] += 1
        stats[0] += float(value.detach())
        stats[1] += t
    return stats.to(device)


def _epoch_batches(task: Task, ds: Dataset, batch_size: int, seed: int) -> list[list[int]]:
    """The index batches of ``task.loader(ds, batch_size, shuffle=True, seed)`` (samples of one
    shape each), drawn without reading any data: a mid-epoch resume skips the finished ones."""
    return [list(b) for b in task.sampler(ds, batch_size, True, torch.Generator().manual_seed(seed))]


# The files ``fit`` writes in its folder; a kill during one of their writes leaves a temporary
# file beside it, which :func:`spade_deploy.io.remove_stale_temps` recognises (nested ones too).
RUN_FILES = ("best.safetensors", "last.safetensors", "history.json")


# Test hook, off by default: $SPADE_KILL_AT names a point of the run at which the process kills
# itself with SIGKILL, so tests interrupt a run at the same place on any machine. ``pretrain:S``:
# after pretraining step S; ``epoch:E:step:S``: after step S of epoch E; ``epoch:E:end``: after
# epoch E's checkpoints; each after the checkpoint written there, if one is. ``mid-save:<point>``:
# inside that point's write of last.safetensors, its temporary file written, not yet renamed.
# Epochs and steps count from 1 and are the run's, not the process's (a resumed run goes on counting).
KILL_ENV = "SPADE_KILL_AT"
_KILL_POINT = re.compile(r"(mid-save:)?(pretrain:[1-9][0-9]*|epoch:[1-9][0-9]*:(?:step:[1-9][0-9]*|end))")


def _kill_point() -> tuple[bool, str] | None:
    """``(mid_save, point)`` from $SPADE_KILL_AT, None where it is unset or empty."""
    raw = os.environ.get(KILL_ENV, "")
    if not raw:
        return None
    match = _KILL_POINT.fullmatch(raw)
    if match is None:
        raise SpadeError(f"${KILL_ENV} is {raw!r}; this test hook takes pretrain:S, epoch:E:step:S or epoch:E:end, "
                         "each also after mid-save: (or unset it)")
    return bool(match[1]), match[2]


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# Test hook, off by default: $SPADE_NAN_AT names a rank, epoch and step (``rank:R:epoch:E:step:S``,
# counting from 0 for the rank and from 1 for the others) whose loss that rank alone makes NaN, so
# tests check that a divergence on one process stops them all.
NAN_ENV = "SPADE_NAN_AT"
_NAN_POINT = re.compile(r"rank:([0-9]+):epoch:([1-9][0-9]*):step:([1-9][0-9]*)")


def _nan_point() -> tuple[int, int, int] | None:
    raw = os.environ.get(NAN_ENV, "")
    if not raw:
        return None
    match = _NAN_POINT.fullmatch(raw)
    if match is None:
        raise SpadeError(f"${NAN_ENV} is {raw!r}; this test hook takes rank:R:epoch:E:step:S (or unset it)")
    return int(match[1]), int(match[2]), int(match[3])


def _step_grads(ctx: distributed.Context, model: Reconstructor, units: list, n: int, compute, seed: tuple[int, ...]):
    """One step's gradients, the mean over the global batch of ``n`` samples, on every rank; returns
    the summed ``[losses, totals, non-finite totals]`` of all ranks."""
    stats = ctx.all_sum(_accumulate(units, n, compute, seed, ctx.device))
    if not stats[2]:
        ctx.reduce_gradients([p for p in model.parameters() if p.requires_grad])
    return stats.cpu()


def _pretrain(model: Reconstructor, task: Task, train_ds: Dataset, cfg: TrainConfig, steps: int, on_step,
              opt: torch.optim.Optimizer, ctx: distributed.Context, resume: dict | None = None,
              save: Callable[[dict], None] | None = None, checkpoint_seconds: float | None = None,
              reached: Callable[[str], None] = lambda point: None) -> None:
    """The denoiser pretraining (``model.pretrain_loss``). Each pass over the data is shuffled with
    the seed ``seed * 1000 - (step at the pass's start) - 1``; each sample draws its noise from
    ``(seed, -1, step, sample)``. ``save(state)`` is called every ``checkpoint_seconds`` (by rank
    0) with what :func:`fit` needs to continue exactly (``resume``)."""
    if resume is None:
        step = pass_start = 0
    else:
        step, pass_start = int(resume["step"]), int(resume["pass_start"])
    model.train()
    recent: list[float] = []
    last_save = time.monotonic()

    def compute(i, items):
        value = model.pretrain_loss(on_model_device(task.pretrain_batch(items), model))
        return value, value

    while step < steps:
        if resume is None or step != int(resume["step"]):
            pass_start = step
        batches = _epoch_batches(task, train_ds, cfg.batch_size, cfg.seed * 1000 - pass_start - 1)
        resume = None
        for batch_ids, units in _shares(task, train_ds, batches[step - pass_start:][:steps - step], ctx, cfg.seed):
            n = len(batch_ids)
            opt.zero_grad(set_to_none=True)
            stats = _step_grads(ctx, model, units, n, compute, (cfg.seed, -1, step))
            if stats[2]:  # every rank alike, before the step writes NaN into the weights
                raise SpadeError(f"pretraining diverged: the loss is {float(stats[1]) / n:g} at step {step + 1} "
                                 "(a lower --pretrain-lr may help)")
            opt.step()
            step += 1
            recent.append(float(stats[0]) / n)
            if (save is not None and checkpoint_seconds is not None and step < steps
                    and time.monotonic() - last_save >= checkpoint_seconds):
                save({"step": step, "pass_start": pass_start})
                last_save = time.monotonic()
            if on_step:
                on_step("pretraining prior", step, steps, float(np.mean(recent[-20:])))
            if step < steps:  # the last step's checkpoint is fit's
                reached(f"pretrain:{step}")


class _Subset(Dataset):
    """Samples ``indices`` of ``dataset``, keeping how they batch (``group_key``) and which volume
    each belongs to (``volume_key``)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices
        for name in ("group_key", "volume_key"):
            if hasattr(dataset, name):
                setattr(self, name, lambda i, f=getattr(dataset, name): f(self.indices[i]))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


def validate(model: Reconstructor, dataset: Dataset, task: Task, batch_size: int,
             ctx: distributed.Context | None = None) -> dict:
    """The validation record of ``model`` on ``dataset`` (``val_psnr``, ``val_ssim``,
    ``val_iterations``, ``val_converged``): with several ranks each scores its share of the volumes
    (:meth:`Task.volumes`, dealt in turn) and the shares' scores are combined as one process's are,
    PSNR and SSIM averaged over volumes, iterations over slices. Raises :class:`SpadeError` on every
    rank when data lacks what scoring needs."""
    ctx = ctx or distributed.Context()
    volumes = task.volumes(dataset) if ctx.active else [list(range(len(dataset)))]  # type: ignore[arg-type]
    mine = volumes[ctx.rank::ctx.world]
    part: dict[str, Any] = {"volumes": len(mine), "slices": sum(map(len, mine))}
    if mine:
        try:
            subset = dataset if not ctx.active else _Subset(dataset, [i for v in mine for i in v])
            res = evaluate(model, subset, task, batch_size=batch_size)
            part.update(psnr=res.psnr, ssim=res.ssim, iterations=res.mean_iterations, converged=res.all_converged)
        except SpadeError as exc:
            part["error"] = str(exc)
    parts = [p for p in ctx.all_gather(part) if p["volumes"]]
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        raise SpadeError(errors[0])
    if len(parts) == 1:
        p = parts[0]
        return {"val_psnr": p["psnr"], "val_ssim": p["ssim"], "val_iterations": p["iterations"],
                "val_converged": p["converged"]}
    vols, slices = sum(p["volumes"] for p in parts), sum(p["slices"] for p in parts)
    iterations = (None if any(p["iterations"] is None for p in parts)
                  else sum(p["iterations"] * p["slices"] for p in parts) / slices)
    converged = None if any(p["converged"] is None for p in parts) else all(p["converged"] for p in parts)
    return {"val_psnr": sum(p["psnr"] * p["volumes"] for p in parts) / vols,
            "val_ssim": sum(p["ssim"] * p["volumes"] for p in parts) / vols,
            "val_iterations": iterations, "val_converged": converged}


def fit(
    model: Reconstructor,
    loss: Loss,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    teacher: Reconstructor | None = None,
    extra_manifest: dict | None = None,
    on_step: Callable[[str, int, int, float], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    checkpoint_seconds: float | None = 120.0,
    task: Task | None = None,
) -> FitResult:
    """Train ``model`` with ``loss``; write ``best.safetensors`` and ``last.safetensors`` in ``out_dir``.

    ``task`` makes the batches and the validation scores (default: the model's own task with its
    default options, :func:`~spade_deploy.tasks.task_for`); both checkpoints record it (``task``).
    Training batches are the task's
    fresh random measurements, or with ``cfg.fixed_masks`` the data as evaluation measures it
    (fine-tuning on the test measurements as acquired).

    One process, or one job over the processes torchrun started (:mod:`spade_deploy.distributed`):
    each rank takes its share of every global batch of ``cfg.batch_size`` samples and the ranks'
    gradients are summed, so every rank takes the same step; each sample is backpropagated alone
    with its random draws seeded from ``(seed, epoch, step, sample)``, so the weights do not depend
    on the number of processes. Rank 0 alone writes and reports (``on_step``, ``on_epoch``);
    a non-finite loss on any rank stops them all; validation is sharded by volume (:func:`validate`).

    ``last.safetensors`` is written after each epoch, after the denoiser pretraining, and within an
    epoch or the pretraining once ``checkpoint_seconds`` have passed since the last write (``0``: after every step;
    ``None``: only at epoch ends). A mid-epoch checkpoint holds the finished step count and the
    running losses, so ``resume`` continues exactly, on any number of processes: the same masks,
    the same batches, the same weights. ``resume`` without a ``last.safetensors`` (a kill before the
    first one) starts afresh. Stale temporary files of a killed run are removed on start."""
    task = task if task is not None else task_for(model)
    cfg = cfg.for_model(model.registry_name)
    pretrain_steps, pretrain_lr = model.pretraining(cfg.model_options)
    if cfg.relative_to == "baseline" and type(task).baseline_error is Task.baseline_error:
        raise SpadeError(f"the {task.name} task has no baseline error to train relative to; use --relative-to reference")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SpadeError(f"output path {out} is a file, expected a folder")
    if checkpoint_seconds is not None and not (math.isfinite(checkpoint_seconds) and checkpoint_seconds >= 0):
        raise SpadeError(f"checkpoint interval must be a finite number of seconds >= 0, got {checkpoint_seconds!r}")
    ctx = distributed.context(cfg.device if cfg.device is not None else str(model_device(model)))
    if cfg.device is not None:
        model.to(ctx.device)
    ctx.broadcast_parameters(model)
    best_path, last_path = out / "best.safetensors", out / "last.safetensors"
    extra_manifest = {"task": task.record(), **(extra_manifest or {}), "world_size": ctx.world}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    pre_opt = torch.optim.Adam(model.parameters(), lr=pretrain_lr)
    history: list[dict] = []
    start_epoch, start_step, start_running, best = 0, 0, [], -math.inf
    pretrain_state = None
    kill, nan_at = _kill_point(), _nan_point()
    if not ctx.main:
        on_step = on_epoch = None

    def reached(point: str) -> None:
        if kill == (False, point):
            ctx.barrier()  # rank 0's checkpoint of this point is written
            _kill_self()

    resumed = resume and last_path.exists()
    if resumed:
        state, manifest = load_checkpoint(last_path)
        ts = manifest.get("train_state")
        if not isinstance(ts, dict) or not ts:
            raise SpadeError(f"{last_path} holds no training state")
        if recorded_config(ts.get("train_config"), cfg) != cfg.record() or not task.same_options(manifest):
            raise SpadeError("--resume with a different training configuration; start a new run instead")
        if manifest.get("model") != model.registry_name or manifest.get("shapes") != model_manifest(model)["shapes"]:
            raise SpadeError(f"{last_path} was written for another architecture; cannot resume")
        check_finite(state, str(last_path))
        try:
            start_epoch, best, history = int(ts["epoch"]), float(ts["best_val_psnr"]), list(ts["history"])
            start_step, start_running = int(ts.get("step", 0)), [float(v) for v in ts.get("running", [])]
            pretrain_state = ts.get("pretrain")
            load_state(model, {k: v for k, v in state.items() if not k.startswith(_OPTIM_PREFIX)}, where=str(last_path))
            _restore_optim(opt, {k: v for k, v in state.items()
                                 if k.startswith(_OPTIM_PREFIX) and not k.startswith(_PRETRAIN_PREFIX)}, ts["optimizer"])
            if pretrain_state is not None:
                _restore_optim(pre_opt, {k: v for k, v in state.items() if k.startswith(_PRETRAIN_PREFIX)},
                               pretrain_state["optimizer"], prefix=_PRETRAIN_PREFIX)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SpadeError(f"{last_path}: its training state is incomplete or corrupt ({type(exc).__name__}); "
                             "start a new run instead") from None
        if not 0 <= start_epoch <= cfg.epochs or start_step < 0:
            raise SpadeError(f"{last_path}: its training state (epoch {start_epoch}, step {start_step}) is inconsistent")
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out, RUN_FILES)
    remove_dead_teacher_folders()  # a killed school run's, on each host
    ctx.barrier()  # every rank has read last.safetensors before rank 0 writes it again

    if teacher is not None:
        if model_device(teacher) != model_device(model):  # a copy: the caller's teacher stays where it is
            teacher = copy.deepcopy(teacher).to(model_device(model))
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    loss.join(ctx)

    model.start_training(cfg.model_options)

    def save_last(point: str, epoch: int, step: int, running: list[float], pretrain: dict | None = None) -> None:
        if not ctx.main:
            return
        optim_tensors, optim_meta = _optim_tensors(opt)
        if pretrain is not None:  # mid-pretraining: its own optimizer and position
            pre_tensors, pretrain["optimizer"] = _optim_tensors(pre_opt, _PRETRAIN_PREFIX)
            optim_tensors.update(pre_tensors)
        train_state = {
            "epoch": epoch,  # finished epochs
            "step": step,  # finished steps of the next epoch (0: at an epoch boundary)
            "running": running,
            "best_val_psnr": best,
            "history": history,
            "optimizer": optim_meta,
            "train_config": cfg.record(),
            **({"pretrain": pretrain} if pretrain is not None else {}),
        }
        tensors = {**model.state_dict(), **optim_tensors}
        manifest = model_manifest(model, **extra_manifest, train_config=cfg.record(), epoch=epoch,
                                  train_state=train_state)
        if kill == (True, point):  # the test hook's torn write: the temporary file whole, never renamed
            with atomic_path(last_path) as tmp:
                save_checkpoint(tmp, tensors, manifest)
                _kill_self()
        save_checkpoint(last_path, tensors, manifest)

    if pretrain_steps and (not resumed or pretrain_state is not None):
        _pretrain(model, task, train_ds, cfg, pretrain_steps, on_step, pre_opt, ctx, resume=pretrain_state,
                  checkpoint_seconds=checkpoint_seconds,
                  save=lambda pre: save_last(f"pretrain:{pre['step']}", 0, 0, [], pretrain=pre), reached=reached)
        done = f"pretrain:{pretrain_steps}"
        save_last(done, 0, 0, [])  # a kill in the first epoch keeps the pretrained prior
        reached(done)

    last_save = time.monotonic()
    for epoch in range(start_epoch, cfg.epochs):
        mid_epoch = epoch == start_epoch and start_step > 0
        model.train()
        batches = _epoch_batches(task, train_ds, cfg.batch_size, cfg.seed * 1000 + epoch)
        n_steps = len(batches) if cfg.max_steps_per_epoch is None else min(len(batches), cfg.max_steps_per_epoch)
        first = min(start_step, n_steps) if mid_epoch else 0
        running = list(start_running) if mid_epoch else []
        for step, (batch_ids, units) in enumerate(_shares(task, train_ds, batches[first:n_steps], ctx, cfg.seed),
                                                  start=first):
            n = len(batch_ids)
            poisoned = nan_at == (ctx.rank, epoch + 1, step + 1)

            def compute(i, items):
                # Fine-tuning on test measurements keeps them as measured; training draws new ones.
                batch = on_model_device(task.eval_batch(items) if cfg.fixed_masks else task.train_batch(items), model)
                if cfg.relative_to == "baseline" and loss.needs_ground_truth:
                    batch.error_scale = task.baseline_error(batch)
                x = model(batch.y, batch.physics)
                value = loss(x, batch, model, teacher)
                penalty = model.training_penalty(batch, x, cfg.model_options, step, (batch_ids.index(i), n))
                total = value + penalty if penalty is not None else value
                return value, total * math.nan if poisoned else total

            opt.zero_grad(set_to_none=True)
            stats = _step_grads(ctx, model, units, n, compute, (cfg.seed, epoch, step))
            if stats[2]:
                # Stop (every rank) before the step writes NaN into the weights (and into last.safetensors).
                kept = f"{best_path} holds the best validated epoch" if best_path.exists() else "no epoch was validated"
                raise SpadeError(f"training diverged: the loss is {float(stats[1]) / n:g} at epoch {epoch + 1}, "
                                 f"step {step + 1}; {kept} (a lower --lr may help)")
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            for group in opt.param_groups:
                group["lr"] = scheduled_lr(cfg, epoch * n_steps + step, cfg.epochs * n_steps)
            opt.step()
            running.append(float(stats[0]) / n)
            if (checkpoint_seconds is not None and step + 1 < n_steps
                    and time.monotonic() - last_save >= checkpoint_seconds):
                save_last(f"epoch:{epoch + 1}:step:{step + 1}", epoch, step + 1, running)
                last_save = time.monotonic()
            if on_step:
                on_step(f"epoch {epoch + 1}/{cfg.epochs}", step + 1, n_steps, float(np.mean(running[-20:])))
            _debug_check_same(ctx, model, f"epoch {epoch + 1} step {step + 1}")
            reached(f"epoch:{epoch + 1}:step:{step + 1}")

        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": float(np.mean(running)) if running else None}
        has_val = cfg.validate and val_ds is not None and len(val_ds) > 0
        skipped = has_val and (epoch + 1) % cfg.val_every != 0 and epoch + 1 != cfg.epochs
        if has_val and not skipped:
            distributed.seed_sample(cfg.seed, epoch, -3)
            try:
                record.update(validate(model, val_ds, task, cfg.batch_size, ctx))
            except SpadeError:
                pass  # validation data without ground truth: keep the last epoch
        # Best = highest validation PSNR among epochs whose fixed points all converged (a DEQ that
        # stops on its cap is not a usable model, however good its PSNR).
        score = -math.inf if skipped else record.get("val_psnr", float(epoch))
        if record.get("val_converged") is False:
            score -= 1000.0
        history.append(record)
        manifest_extra = {**extra_manifest, "train_config": cfg.record(), "epoch": epoch + 1}
        if score > best:
            best = score
            record["best"] = True
            if ctx.main:
                save_checkpoint(best_path, model.state_dict(), model_manifest(model, **manifest_extra, history=history))
        save_last(f"epoch:{epoch + 1}:end", epoch + 1, 0, [])
        last_save = time.monotonic()
        if on_epoch:
            on_epoch(record)
        reached(f"epoch:{epoch + 1}:end")
    best_record = [h for h in history if h.get("best")][-1]
    return FitResult(best_path=best_path, last_path=last_path, best_val_psnr=best_record.get("val_psnr", float("nan")),
                     history=history)


# Debugging aid, off by default: with $SPADE_CHECK_RANKS=1 every rank hashes its weights after each
# step and the run stops (one line) if any two differ; the tests run it.
CHECK_RANKS_ENV = "SPADE_CHECK_RANKS"


def _debug_check_same(ctx: distributed.Context, model: Reconstructor, where: str) -> None:
    if not ctx.active or os.environ.get(CHECK_RANKS_ENV, "") != "1":
        return
    import hashlib

    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    digests = ctx.all_gather(digest.hexdigest())
    if len(set(digests)) != 1:
        raise SpadeError(f"the ranks' weights differ after {where}: {', '.join(d[:12] for d in digests)}")
