"""Imaging tasks: one module per task owns everything the rest of the toolchain must not know.

A :class:`Task` says how its data is read (datasets, collation, batching), how a batch of
measurements and its operator are made from it (:class:`Batch`, with a
:class:`~spade_deploy.physics.Physics`), what the model is scored against and how
(:meth:`Task.evaluate`, beside the task's naive baseline), and which options it takes. The trainer,
the losses, fine-tuning, the bench and the demo take a task and call only what is declared here.

A model declares the task it solves (its :class:`~spade_deploy.models.ModelEntry`'s ``task``);
:func:`task_for` builds that task. A task lives in its own package (``spade_deploy/mri/``,
``spade_deploy/sr/``), registers itself (:func:`register_task`), reads its own command-line options
(:meth:`Task.from_cli`) and writes its own reconstructions (:meth:`Task.reconstruct`); a third task
is its package and one line in :data:`spade_deploy.plugins.TASK_PACKAGES`.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..distributed import seed_sample
from ..errors import SpadeError
from ..options import CliOption
from ..physics import Physics
from ..plugins import load_task_packages

# name -> task class; each task package registers its own (register_task).
_TASKS: dict[str, type["Task"]] = {}


@dataclass
class Batch:
    """One batch of measurements as a task makes it.

    ``y``: the measurements; ``physics``: their operator; ``x_gt``: the image the model is trained
    towards where it is known (the task's ground truth, e.g. SR's high-resolution image);
    ``target``: the image it is scored against (the task's reference, :attr:`Task.reference_name`);
    ``keys``: one hashable identity per sample (what a teacher's output is cached under);
    ``meta``: what the task itself needs later (e.g. sizes to crop to, file names);
    ``error_scale``: per sample, the squared norm supervised training divides its error by. None:
    the reference's own (a scale-free relative error); the trainer sets the task's baseline
    error there when the run is ``relative_to="baseline"`` (:class:`~spade_deploy.train.TrainConfig`).
    """

    y: torch.Tensor
    physics: Physics
    x_gt: torch.Tensor | None
    target: torch.Tensor | None
    keys: list = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    error_scale: torch.Tensor | None = None


class ShapeBatchSampler(Sampler[list[int]]):
    """Batches of at most ``batch_size`` slices of one shape (:meth:`SliceDataset.group_key`), so a
    folder may mix image sizes and coil counts. Without ``shuffle`` slices keep their order; with
    it, one ``torch.randperm`` of ``generator`` orders them and each shape's batches fill in that
    order."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None):
        if batch_size < 1:
            raise SpadeError(f"batch size must be at least 1, got {batch_size}")
        self.dataset, self.batch_size, self.shuffle, self.generator = dataset, batch_size, shuffle, generator
        n = len(dataset)  # type: ignore[arg-type]
        key = getattr(dataset, "group_key", None)
        self._keys = [key(i) if key else () for i in range(n)]

    def __len__(self) -> int:
        counts: dict = {}
        for k in self._keys:
            counts[k] = counts.get(k, 0) + 1
        return sum(math.ceil(c / self.batch_size) for c in counts.values())

    def __iter__(self):
        n = len(self._keys)
        order = torch.randperm(n, generator=self.generator).tolist() if self.shuffle else range(n)
        open_: dict = {}
        for i in order:
            batch = open_.setdefault(self._keys[i], [])
            batch.append(i)
            if len(batch) == self.batch_size:
                yield batch
                open_[self._keys[i]] = []
        for batch in open_.values():
            if batch:
                yield batch


class SeededReads(Dataset):
    """``dataset`` whose sample ``i`` is read with the global random states (python, NumPy, torch)
    seeded from ``(seed, i)`` and put back afterwards. Reading a sample may draw from them (an
    estimate's random start, whether it does depending on a cache): so it draws alike whichever
    process, loader worker or step reads it, and reading never moves the caller's random streams."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        seed_sample(self.seed, -2, i)
        try:
            return self.dataset[i]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])


class Scores(Protocol):
    """What every task's evaluation reports (the trainer validates on these)."""

    psnr: float
    ssim: float
    psnr_baseline: float  # the task's naive reconstruction, scored alike
    ssim_baseline: float
    mean_iterations: float | None  # fixed-point models: mean solver iterations; else None
    all_converged: bool | None

    def as_dict(self) -> dict: ...


@dataclass
class TableReport:
    """A table for the user (the command line renders it): ``justify`` per column (``left`` /
    ``right``), then ``notes``, lines printed after it."""

    title: str
    columns: list[str]
    justify: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


class Task:
    """Base class of an imaging task. Subclasses implement the methods that raise; the others
    have defaults that fit datasets of samples grouped by shape."""

    name: str = ""
    baseline_name: str = ""  # the naive reconstruction scores are compared with (tables)
    reference_name: str = ""  # what the model is scored against (tables)
    scores_name: str = ""  # how scores are computed, in a few words (result files)
    bench_header: str = ""  # the same for a benchmark table's header

    # The command-line options that belong to this task, each with the commands that take them:
    # the ``spade`` command adds them and hands their values to :meth:`from_cli` (and to
    # :meth:`reconstruct`) by name.
    cli_options: tuple[CliOption, ...] = ()

    # How many loader processes read the task's data in training and evaluation (0: the calling
    # process itself); the ``--workers`` of the commands that read data.
    workers: int = 0

    # -- options ---------------------------------------------------------------------------------
    def options(self) -> dict:
        """The task's options, as recorded in manifests and result files."""
        return {}

    def record(self) -> dict:
        """What a checkpoint or a result file records of the task: its name and options."""
        return {"name": self.name, **self.options()}

    def recorded_options(self, manifest: dict) -> dict | None:
        """The options of this task a checkpoint's manifest records (its ``task``), or None."""
        rec = manifest.get("task")
        if isinstance(rec, dict) and rec.get("name") == self.name:
            return {k: v for k, v in rec.items() if k != "name"}
        return None

    def same_options(self, manifest: dict) -> bool:
        """Whether the run that wrote ``manifest`` used this task's options (each option it
        records equals this task's; a run recording none is taken as using them)."""
        rec = self.recorded_options(manifest)
        mine = json.loads(json.dumps(self.options()))
        return rec is None or all(mine.get(k) == v for k, v in rec.items())

    @classmethod
    def from_cli(cls, data: Path | None, options: dict[str, Any]) -> "Task":
        """The task from the command line's ``--data`` and task options (``options`` holds every
        task's options by name; a task reads its own, validating them with one-line errors)."""
        return cls()

    def data_root(self, data: Path | None, reporter=None) -> Path | None:
        """The root of the task's splits for ``--data`` (None: the task's embedded data, built on
        first use where it has to be, telling ``reporter``, a :class:`~spade_deploy.progress.Reporter`)."""
        return data

    def dataset_key(self, root: str | Path | None) -> dict | None:
        """What identifies the task's embedded data (under ``root``; a task whose embedded data
        needs no folder gets None), so that a base model shipped with the package is used only on
        the data it was trained on (the model entry's bundled weights); None for a user's data."""
        return None

    # -- data ----------------------------------------------------------------------------------
    def dataset(self, root: str | Path, split: str) -> Dataset:
        """The ``split`` (train | val | test) of the data under ``root``."""
        raise NotImplementedError

    def has_split(self, root: str | Path, split: str) -> bool:
        return (Path(root) / split).is_dir()

    def has_ground_truth(self, dataset: Dataset) -> bool:
        """Whether every sample of ``dataset`` carries its reference image (default: yes)."""
        return True

    def check_model(self, model: torch.nn.Module, where: str | Path) -> None:
        """Refuse (one-line :class:`SpadeError`) a model that solves another task than this one."""
        theirs = model.task
        if theirs != self.name:
            name = model.registry_name
            raise SpadeError(f"{where} is a {name} model ({theirs} task), not one for the {self.name} task of this "
                             "command (give checkpoints of one task)")

    def check_ground_truth(self, dataset: Dataset, who: str, where: str | Path) -> None:
        """Refuse (one-line :class:`SpadeError`) data a supervised ``who`` cannot learn from."""
        if not self.has_ground_truth(dataset):
            raise SpadeError(f"{who} needs ground truth, but {where} has none")

    def collate(self, items: list) -> Any:
        raise NotImplementedError

    def sampler(self, dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator) -> Sampler:
        """Index batches of samples of one shape (a dataset's ``group_key``), shuffled by one
        ``torch.randperm`` of ``generator``."""
        return ShapeBatchSampler(dataset, batch_size, shuffle=shuffle, generator=generator)

    def loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
        """Batches of ``dataset`` in the sampler's order (shuffled with ``seed``), read by
        :attr:`workers` loader processes."""
        sampler = self.sampler(dataset, batch_size, shuffle, torch.Generator().manual_seed(seed))
        return DataLoader(SeededReads(dataset), batch_sampler=sampler, collate_fn=self.collate,
                          num_workers=self.workers, generator=torch.Generator().manual_seed(seed))

    def volumes(self, dataset: Dataset) -> list[list[int]]:
        """The sample indices of ``dataset`` grouped by the volume they belong to (a dataset's
        ``volume_key``; without one each sample is its own), in order of first appearance: what
        scores are averaged over, and so what sharded evaluation deals out whole."""
        key = getattr(dataset, "volume_key", None)
        groups: dict = {}
        for i in range(len(dataset)):  # type: ignore[arg-type]
            groups.setdefault(key(i) if key is not None else i, []).append(i)
        return list(groups.values())

    # -- batches -------------------------------------------------------------------------------
    def train_batch(self, items: Any) -> Batch:
        """A training batch: fresh random measurements (masks, degradations) drawn from the global
        random states (which the trainer seeds and checkpoints)."""
        raise NotImplementedError

    def eval_batch(self, items: Any) -> Batch:
        """The batch as evaluation measures it: deterministic for the same data."""
        raise NotImplementedError

    def pretrain_batch(self, items: Any) -> Batch:
        """A batch for a model's own pretraining (``pretrain_loss``). Default: a training batch."""
        return self.train_batch(items)

    def synthetic_sample(self, height: int, width: int, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, Physics]:
        """Measurements ``(y, physics)`` of a random image whose measurements are ``height x width``
        (deterministic by ``seed``): what the deployment engines are timed on where no sample of
        the data is at hand (the cost of an iteration does not depend on the values)."""
        raise NotImplementedError

    def prior_size(self, dataset: Dataset) -> tuple[int, int]:
        """The image size ``(H, W)`` the priors see on ``dataset``'s first sample (what a TensorRT
        engine's profile is built for)."""
        raise NotImplementedError

    def sample_label(self, key: Any) -> str:
        """A sample's key (``Batch.keys``) as text: its parts joined by ``:``."""
        return ":".join(map(str, key)) if isinstance(key, tuple) else str(key)

    # -- deployment ------------------------------------------------------------------------------
    def reconstruct(self, checkpoint: Path, source: Path, out: Path, backend: str = "auto",
                    engines: Path | None = None, batch_size: int = 4, options: dict[str, Any] | None = None,
                    reporter=None) -> list[str]:
        """``spade reconstruct``: the measurements under ``source`` reconstructed by ``checkpoint``
        on ``backend`` into ``out`` in the task's output format (``options``: the task's own
        command-line options, by name); returns the lines to tell the user."""
        raise NotImplementedError

    # -- scores --------------------------------------------------------------------------------
    def evaluate(self, model: torch.nn.Module, dataset: Dataset, solver=None, batch_size: int = 4,
                 on_batch: Callable[[int, int], None] | None = None) -> Scores:
        """The task's scores of ``model`` on ``dataset``, beside its baseline's."""
        raise NotImplementedError

    def score_table(self, scores: Scores, model: str, split: str) -> "TableReport":
        """``spade eval``'s table of ``scores`` of ``model`` on ``split``, beside the baseline's."""
        raise NotImplementedError

    # Benchmark table columns showing secondary scores: header -> (score name, format).
    secondary_columns: dict[str, tuple[str, str]] = {}

    def secondary_scores(self, scores: Scores) -> dict[str, Any]:
        """The scores a benchmark row carries besides PSNR / SSIM (``BenchRow.scores``, and the
        result files' columns; default none)."""
        return {}

    def result_config(self, scores: Scores) -> dict[str, Any]:
        """What a benchmark records of how the data was read (default nothing)."""
        return {}

    # -- figures -------------------------------------------------------------------------------
    def baseline(self, batch: Batch) -> torch.Tensor:
        """The naive reconstruction of ``batch`` (an output the model could have given)."""
        raise NotImplementedError

    def baseline_error(self, batch: Batch) -> torch.Tensor:
        """Per sample, the squared error of the naive reconstruction against ``batch.x_gt``: what
        supervised training divides a sample's error by with ``relative_to="baseline"``."""
        raise NotImplementedError

    def shown_reference(self, batch: Batch):
        """The first sample's reference image as scored, a ``(H, W)`` or ``(H, W, 3)`` array."""
        raise NotImplementedError

    def shown_input(self, batch: Batch):
        """The first sample's measurements as an image for figures, or None (default: not shown)."""
        return None

    def shown(self, batch: Batch, x: torch.Tensor):
        """The first sample of output ``x`` as scored (same shape as :meth:`shown_reference`)."""
        raise NotImplementedError

    def example_psnr(self, reference, image) -> float:
        """PSNR of a shown image against the shown reference (figures), as the task scores it."""
        raise NotImplementedError


def register_task(cls: type[Task]) -> type[Task]:
    """Register a task class under its ``name`` (a class decorator; its package is listed in
    :data:`spade_deploy.plugins.TASK_PACKAGES`)."""
    _TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    load_task_packages()
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    load_task_packages()
    if name not in _TASKS:
        raise SpadeError(f"unknown task {name!r}; choose one of: {', '.join(sorted(_TASKS))}")
    return _TASKS[name]


def task_for(model: torch.nn.Module, **options: Any) -> Task:
    """The task ``model`` solves (its ``task``, from its registry entry), with ``options`` (else its defaults)."""
    return task_class(model.task)(**options)
