"""The interface of every task's measurement operator, and the image transformations of
equivariant imaging.

Operators are ``nn.Module`` classes whose tensors are buffers (``.to(device)`` moves them); each
task implements one (:class:`~spade_deploy.mri.physics.MultiCoilMRI`,
:class:`~spade_deploy.sr.physics.SRPhysics`).
"""

from __future__ import annotations

import torch
from torch import nn


def random_quarter_turns(x: torch.Tensor) -> list[int]:
    """A random non-identity element of the rotation group per sample, in quarter turns: 90, 180 or
    270 degrees on square images (exact on the grid), 180 degrees on rectangular ones."""
    if x.shape[-1] != x.shape[-2]:
        return [2] * x.shape[0]
    return torch.randint(1, 4, (x.shape[0],)).tolist()


def rotate_images(x: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Sample ``b`` of ``x`` turned by ``ks[b]`` quarter turns (over the last two dimensions)."""
    return torch.stack([torch.rot90(xi, k, dims=(-2, -1)) for xi, k in zip(x, ks)])


class Physics(nn.Module):
    """The interface every measurement operator of a task implements (trainer, losses and models
    use nothing else): the forward operator ``A``, its adjoint, the gradient of the data term,
    the operator of a sub-batch, and the operator seen in rotated images (equivariant imaging).
    Operators are ``nn.Module`` s whose tensors are buffers, so ``.to(device)`` moves them."""

    def A(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Gradient of ``0.5 * ||A x - y||^2``."""
        return self.A_adjoint(self.A(x) - y)

    def select(self, index) -> "Physics":
        """The operator of a sub-batch (a slice or indices of the batch)."""
        raise NotImplementedError

    def rotate(self, ks: list[int]) -> "Physics":
        """The operator that measures images rotated by ``ks[b]`` quarter turns (sample ``b``)
        as this one measures the unrotated images (the task decides what turns with the scene)."""
        raise NotImplementedError

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, "Physics"]:
        """Equivariant imaging: a random transformation ``phi`` of the images ``x`` and the
        operator measuring them, ``(phi x, A_phi)``. Default: a random rotation per sample
        (:func:`random_quarter_turns`, torch's global random state) with :meth:`rotate`."""
        ks = random_quarter_turns(x)
        return rotate_images(x, ks), self.rotate(ks)
