"""The MRI measurement operator and its helpers (an ``nn.Module`` with buffers, :class:`~spade_deploy.physics.Physics`).

Convention (checked at module edges): complex dtypes inside physics; real 2-channel tensors
``(B, 2, H, W)`` at the prior boundary (see :func:`complex_to_channels`).

MRI: multi-coil ``A = P F S`` with the centred orthonormal 2-D FFT (the same numbers as
``fastmri.fft2c`` / ``fastmri.ifft2c``), a Cartesian column mask ``P`` and coil maps ``S``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SpadeError
from ..physics import Physics, rotate_images

# Sampling rates used in the paper (16.7 %, 12.5 %, 10 %) and the auto-calibration fraction used
# with each. fastMRI's equispaced-fraction masks need center_fraction < 1/acceleration.
PAPER_ACCELERATIONS = (6, 8, 10)
DEFAULT_CENTER_FRACTIONS = {4: 0.08, 6: 0.08, 8: 0.04, 10: 0.04}


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT over the last two dimensions of a complex tensor."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    x = torch.fft.fft2(x, dim=(-2, -1), norm="ortho")
    return torch.fft.fftshift(x, dim=(-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D inverse FFT over the last two dimensions of a complex tensor."""
    k = torch.fft.ifftshift(k, dim=(-2, -1))
    k = torch.fft.ifft2(k, dim=(-2, -1), norm="ortho")
    return torch.fft.fftshift(k, dim=(-2, -1))


def complex_to_channels(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W) complex -> (B, 2, H, W) real (real, imaginary)."""
    if not torch.is_complex(x) or x.dim() != 3:
        raise ValueError(f"expected a complex (B, H, W) image, got {tuple(x.shape)} {x.dtype}")
    return torch.stack((x.real, x.imag), dim=1)


def channels_to_complex(x: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) real -> (B, H, W) complex."""
    if torch.is_complex(x) or x.dim() != 4 or x.shape[1] != 2:
        raise ValueError(f"expected a real (B, 2, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    return torch.complex(x[:, 0], x[:, 1])


def equispaced_mask(
    num_cols: int, center_fraction: float, acceleration: int, seed: int | None = None, offset: int | None = None
) -> np.ndarray:
    """1-D Cartesian equispaced column mask with auto-calibration lines.

    Equal to ``fastmri.data.subsample.EquispacedMaskFractionFunc([cf], [acc])(shape, seed=seed)``:
    the same adjusted spacing, the same centre block and, for a given seed, the same random offset.
    Returns a float32 vector of length ``num_cols``.
    """
    if acceleration <= 1:
        raise SpadeError(f"acceleration must be > 1, got {acceleration}")
    if not 0 < center_fraction < 1.0 / acceleration:
        raise SpadeError(
            f"center fraction {center_fraction} must lie in (0, 1/acceleration = {1 / acceleration:.3f})"
        )
    rng = np.random.RandomState(seed)
    num_low = round(num_cols * center_fraction)
    center = np.zeros(num_cols, dtype=np.float32)
    pad = (num_cols - num_low + 1) // 2
    center[pad : pad + num_low] = 1
    adjusted = (acceleration * (num_low - num_cols)) / (num_low * acceleration - num_cols)
    if offset is None:
        offset = rng.randint(0, high=round(adjusted))
    accel = np.zeros(num_cols, dtype=np.float32)
    idx = np.around(np.arange(offset, num_cols - 1, adjusted)).astype(np.uint)
    accel[idx] = 1.0
    return np.maximum(center, accel)


def center_fraction_for(acceleration: int) -> float:
    try:
        return DEFAULT_CENTER_FRACTIONS[acceleration]
    except KeyError:
        raise SpadeError(
            f"no default centre fraction for acceleration {acceleration}; "
            f"choose one of {sorted(DEFAULT_CENTER_FRACTIONS)} or pass --center-fraction"
        ) from None


def normal_columns(x: torch.Tensor, smaps: torch.Tensor, column_filter: torch.Tensor) -> torch.Tensor:
    """``N x = A^H A x`` of :class:`MultiCoilMRI` from its coil maps and its column filter
    (:meth:`MultiCoilMRI.grad_terms`): one-dimensional FFTs along ``W`` (see :meth:`MultiCoilMRI.grad`)."""
    k = torch.fft.fft(smaps * x.unsqueeze(1), dim=-1, norm="ortho")
    r = torch.fft.ifft(column_filter * k, dim=-1, norm="ortho")
    return (smaps.conj() * r).sum(dim=1)


class MultiCoilMRI(Physics):
    """``A = P F S``: coil maps ``S`` (B, C, H, W), centred orthonormal FFT ``F``, column mask ``P``.

    ``mask`` broadcasts against k-space ``(B, C, H, W)``: shape ``(B, 1, 1, W)`` or ``(W,)``.
    With coil maps normalised so that ``sum_c |S_c|^2 <= 1`` the operator norm is at most one, so
    the gradient step ``x - gamma * A^H (A x - y)`` is non-expansive for ``0 < gamma <= 2``.
    """

    def __init__(self, mask: torch.Tensor, smaps: torch.Tensor):
        super().__init__()
        if not torch.is_complex(smaps) or smaps.dim() != 4:
            raise SpadeError(f"coil maps must be complex (B, C, H, W), got {tuple(smaps.shape)} {smaps.dtype}")
        if mask.dim() == 1:
            mask = mask.view(1, 1, 1, -1)
        if mask.dim() != 4 or mask.shape[-1] != smaps.shape[-1]:
            raise SpadeError(
                f"mask of shape {tuple(mask.shape)} does not match coil maps of width {smaps.shape[-1]}"
            )
        self.register_buffer("mask", mask.to(smaps.real.dtype))
        self.register_buffer("smaps", smaps)

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W) complex image -> (B, C, H, W) masked multi-coil k-space."""
        return self.mask * fft2c(self.smaps * x.unsqueeze(1))

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) k-space -> (B, H, W) coil-combined image."""
        return (self.smaps.conj() * ifft2c(self.mask * y)).sum(dim=1)

    def grad(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``A^H (A x - y) = N x - A^H y`` with ``N = A^H A`` as one-dimensional FFTs along the
        columns' axis, without shifts.

        The mask ``P`` is constant along ``H``, so the centred FFT along ``H`` cancels in
        ``F^-1 P^2 F``; what is left along ``W``, ``F_W^-1 P^2 F_W`` with the centring shifts, is a
        circular convolution, which commutes with those shifts: ``N x = sum_c conj(S_c)
        ifft_W(ifftshift(P^2) * fft_W(S_c x))`` for any ``H, W``. Half the FFT work of the 2-D
        form and no ``roll``; ``A^H y`` is computed once per measurement (the solver passes one
        ``y`` throughout). Equal to fastMRI's centred form up to FFT rounding."""
        if x.shape[-2:] != self.smaps.shape[-2:]:
            return super().grad(x, y)
        smaps, column_filter, aty = self.grad_terms(y)
        return normal_columns(x, smaps, column_filter) - aty

    def grad_terms(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(smaps, column_filter, A^H y)``: the tensors :meth:`grad` computes ``A^H (A x - y)``
        from, as ``normal_columns(x, smaps, column_filter) - A^H y``. The caching lives here, so
        what uses them (a compiled DEQ iteration) is a function of tensors alone."""
        return self.smaps, self._column_filter(), self._adjoint_of(y)

    def _adjoint_of(self, y: torch.Tensor) -> torch.Tensor:
        """``A^H y``, kept for the next call with the same ``y``; computed afresh where gradients
        flow to ``y`` (equivariant imaging differentiates a reconstruction through its input)."""
        if y.requires_grad and torch.is_grad_enabled():
            return self.A_adjoint(y)
        key = (id(y), y._version, id(self.smaps), id(self.mask))
        if self._aty_key != key:  # the tensors are held with it, so no identity can be reused
            self._aty_key, self._aty_of, self._aty = key, (y, self.smaps, self.mask), self.A_adjoint(y)
        return self._aty

    def _column_filter(self) -> torch.Tensor:
        """``ifftshift(P^2)`` along ``W``: the mask in the unshifted FFT's frequency order."""
        cached = getattr(self, "_filter_cache", None)
        if cached is None or cached[1] is not self.mask:  # .to() replaces the buffer
            cached = self._filter_cache = (torch.fft.ifftshift(self.mask * self.mask, dim=-1), self.mask)
        return cached[0]

    _aty_key = None

    def select(self, index) -> "MultiCoilMRI":
        """The operator of a sub-batch (a slice or indices of the batch)."""
        mask = self.mask[index] if self.mask.shape[0] > 1 else self.mask
        return MultiCoilMRI(mask, self.smaps[index])

    def rotate(self, ks: list[int]) -> "MultiCoilMRI":
        """The acquisition seen in images rotated by ``ks[b]`` quarter turns (sample ``b``).

        Used by equivariant imaging: coil maps rotate with the image; the column mask stays the
        scanner's (it is a property of the acquisition, not of the object). Odd turns need
        square images.
        """
        return MultiCoilMRI(self.mask, rotate_images(self.smaps, ks))


def synthetic_sample(height: int, width: int, coils: int = 8, device: str = "cpu", seed: int = 0):
    """Measurements ``(y, physics)`` of a random image of ``height x width`` with ``coils`` random
    coil maps and a random column mask: what the engines are timed on where no slice of the data
    is at hand (the cost of an iteration does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    smaps = torch.randn(1, coils, height, width, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = (torch.rand(width, generator=g) < 0.25).float()
    mask[width // 2 - max(1, width // 25): width // 2 + max(1, width // 25)] = 1
    physics = MultiCoilMRI(mask, smaps).to(device)
    x = torch.randn(1, height, width, dtype=torch.complex64, generator=g).to(device)
    return physics.A(x), physics



def rss(coil_images: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Root-sum-of-squares coil combination."""
    return torch.sqrt((coil_images.abs() ** 2).sum(dim=dim))
