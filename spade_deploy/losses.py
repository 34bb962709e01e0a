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
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

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
    holds one batch of them, however large the data. They are kept in a temporary folder of this
    process, removed when it ends; :meth:`share` gives every run with the same teacher on the same
    measurements one folder (``spade demo`` distils one teacher into every pruned model).
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
            self._SHARED[key] = self._new_folder()
        self._folder = self._SHARED[key]

    @staticmethod
    def _new_folder() -> Path:
        folder = Path(tempfile.mkdtemp(prefix="spade-teacher-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return folder

    def teacher_output(self, batch: Batch, teacher) -> torch.Tensor:
        if self._folder is None:
            self._folder = self._new_folder()
        paths = [self._folder / f"{hashlib.sha256(repr(k).encode()).hexdigest()[:32]}.safetensors" for k in batch.keys]
        outputs = [load_file(p)["x"].to(batch.y.device) if p.exists() else None for p in paths]
        missing = [i for i, o in enumerate(outputs) if o is None]
        if missing:
            with torch.no_grad():
                idx = torch.tensor(missing)
                out = teacher(batch.y[idx], batch.physics.select(idx))
            for j, i in enumerate(missing):
                outputs[i] = out[j]
                with atomic_path(paths[i]) as tmp:
                    save_file({"x": out[j].detach().cpu().contiguous()}, str(tmp))
        return torch.stack(outputs)

    def __call__(self, x_net, batch, model, teacher=None):
        return relative_sq_error(*model.distillation_pair(x_net, self.teacher_output(batch, teacher)))


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
