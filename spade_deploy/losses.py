"""Training and fine-tuning losses, one signature for all: ``loss(x_net, batch, model, teacher)``.

The trainer never branches on a strategy's name: each strategy is a sibling class (STYLE 3).
``x_net`` is the reconstruction, ``batch`` a :class:`Batch` made by the task
(:mod:`spade_deploy.tasks`). Which part of the output is compared with which reference is the
model's (:meth:`Reconstructor.supervised_pair`, :meth:`Reconstructor.distillation_pair`); the
losses know no task.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .io import atomic_path
from .tasks import Batch


def relative_sq_error(x: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the batch of ``||x - ref||^2 / scale`` with ``scale = ||ref||^2`` unless given
    (per sample): scale-free across slices."""
    b = x.shape[0]
    num = (x - ref).abs().pow(2).reshape(b, -1).sum(1)
    den = ref.abs().pow(2).reshape(b, -1).sum(1) if scale is None else scale.to(num)
    return (num / den.clamp_min(1e-12)).mean()


class Loss:
    needs_ground_truth = False
    needs_teacher = False

    def __call__(self, x_net, batch: Batch, model, teacher=None) -> torch.Tensor:
        raise NotImplementedError

    def join(self, ctx) -> None:
        """Called by every rank of a job (:class:`spade_deploy.distributed.Context` ``ctx``) before
        training: what the ranks' losses share, they agree on here. Default: nothing."""


class SupervisedLoss(Loss):
    """Eq. (7): distance between the reconstruction and the ground truth (relative to
    ``batch.error_scale`` where the run sets one)."""

    needs_ground_truth = True

    def __call__(self, x_net, batch, model, teacher=None):
        return relative_sq_error(*model.supervised_pair(x_net, batch), batch.error_scale)


class SchoolLoss(Loss):
    """Eq. (8): distil from the unpruned model (teacher) on the test measurements (what of the two
    outputs is compared: :meth:`Reconstructor.distillation_pair`).

    The teacher's reconstruction of a measurement never changes, so it is computed once per
    sample (``batch.keys``), written to disk and read back when the sample comes again: memory
    holds one batch of them, however large the data. They are kept in a temporary folder
    (``spade-teacher-<pid>-<host>-*`` in the temp folder), removed when the process ends; one a
    kill left behind is removed by the next run on that host (:func:`remove_dead_teacher_folders`).
    :meth:`share` gives every run with the same teacher on the same measurements one folder
    (``spade demo`` distils one teacher into every pruned model); :meth:`join` gives the ranks of a
    job that see rank 0's folder that one, so a sample that moves between ranks is not redone.
    """

    needs_teacher = True
    # share key -> the temporary folder of that teacher's reconstructions in this process
    _SHARED: dict[tuple, Path] = {}

    def __init__(self) -> None:
        self._folder: Path | None = None

    def share(self, key: tuple) -> None:
        """Use the process-wide folder of ``key``: one identity of the teacher's weights and of the
        measurements (file, task options, split) together."""
        if key not in self._SHARED:
            self._SHARED[key] = _new_teacher_folder()
        self._folder = self._SHARED[key]

    def join(self, ctx) -> None:
        """Every rank takes rank 0's folder where it sees it (the ranks of rank 0's host), its own otherwise."""
        if self._folder is None:
            self._folder = _new_teacher_folder()
        if not ctx.active:
            return
        leader = Path(ctx.all_gather(str(self._folder))[0])
        if leader != self._folder and leader.is_dir():
            shutil.rmtree(self._folder, ignore_errors=True)
            for key, folder in self._SHARED.items():
                if folder == self._folder:
                    self._SHARED[key] = leader
            self._folder = leader

    def teacher_output(self, batch: Batch, teacher) -> torch.Tensor:
        if self._folder is None:
            self._folder = _new_teacher_folder()
        paths = [self._folder / f"{hashlib.sha256(repr(k).encode()).hexdigest()[:32]}.safetensors" for k in batch.keys]
        outputs = [load_file(p)["x"].to(batch.y.device) if p.exists() else None for p in paths]
        missing = [i for i, o in enumerate(outputs) if o is None]
        if missing:
            with torch.no_grad():
                idx = torch.tensor(missing)
                out = teacher(batch.y[idx], batch.physics.select(idx))
            for j, i in enumerate(missing):
                outputs[i] = out[j]
                with atomic_path(paths[i]) as tmp:  # another rank may read it, or write it too
                    tmp.write_bytes(save({"x": out[j].detach().cpu().contiguous()}))
        return torch.stack(outputs)

    def __call__(self, x_net, batch, model, teacher=None):
        return relative_sq_error(*model.distillation_pair(x_net, self.teacher_output(batch, teacher)))


_TEACHER_PREFIX = "spade-teacher-"
# mkdtemp(prefix=f"{_TEACHER_PREFIX}{pid}-{host}-"): its random part is 8 letters, digits or _.
_TEACHER_FOLDER = re.compile(re.escape(_TEACHER_PREFIX) + r"(?P<pid>[0-9]+)-(?P<host>.+)-[A-Za-z0-9_]{8}")


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def _new_teacher_folder() -> Path:
    remove_dead_teacher_folders()
    folder = Path(tempfile.mkdtemp(prefix=f"{_TEACHER_PREFIX}{os.getpid()}-{_host()}-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_teacher_folders() -> list[Path]:
    """Delete the school loss's temporary folders that processes of this host and user left in
    the temp folder when they were killed (their process id no longer runs). Returns what it removed."""
    removed = []
    host, uid = _host(), os.getuid()
    for entry in Path(tempfile.gettempdir()).glob(f"{_TEACHER_PREFIX}*"):
        match = _TEACHER_FOLDER.fullmatch(entry.name)
        if match is None or match["host"] != host or int(match["pid"]) == os.getpid():
            continue
        try:
            owned = entry.is_dir() and not entry.is_symlink() and entry.stat().st_uid == uid
        except OSError:
            continue
        if owned and not _alive(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return sorted(removed)


class SelfSupervisedLoss(Loss):
    """Eq. (9): data fidelity ``||A f(y) - y||`` plus equivariant imaging on the test measurements.

    Fidelity: the model's own prediction of the measurements
    (:meth:`Reconstructor.predicted_measurements`: ``A x`` by default; a model whose native
    output is in the measurement domain predicts the measurements there, the models' docstrings
    say why).

    EI: ``x_phi = phi f(y)`` with ``phi`` a random transformation of the operator's group
    (:meth:`Physics.transform`), measured by the operator transformed with it (super-resolution:
    a rotation with the kernel turned, then a circular shift; each task's physics documents its
    own): ``f(A_phi x_phi)`` must give ``x_phi`` back. ``A`` is the model's own operator
    (:meth:`Reconstructor.measurement_operator`). No ground truth, no teacher.
    """

    def __init__(self, ei_weight: float = 1.0) -> None:
        self.ei_weight = ei_weight

    def fidelity(self, x_net, batch, model) -> torch.Tensor:
        return relative_sq_error(model.predicted_measurements(x_net, batch.y, batch.physics), batch.y)

    def __call__(self, x_net, batch, model, teacher=None):
        fidelity = self.fidelity(x_net, batch, model)
        physics = model.measurement_operator(batch.y, batch.physics)
        x_phi, physics_phi = physics.transform(x_net)
        x_rec = model(physics_phi.A(x_phi), physics_phi)
        return fidelity + self.ei_weight * relative_sq_error(x_rec, x_phi)


STRATEGIES = {"supervised": SupervisedLoss, "school": SchoolLoss, "self-supervised": SelfSupervisedLoss}
