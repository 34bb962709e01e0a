"""Super-resolution physics: ``A = S H``, circular blur ``H`` then the standard s-fold downsampler ``S``.

The degradation model of USRNet (Zhang, Van Gool, Timofte, CVPR 2020): ``y = (x (*) k) |s + n`` with
``(*)`` a circular (wrap-around) convolution with the blur kernel ``k`` and ``|s`` keeping the pixel
at ``(0, 0)`` of every ``s x s`` block. Both are diagonal in the right Fourier bases, so the data step
of the unfolded half-quadratic splitting has a closed form (:meth:`SRPhysics.data_step`): the solution
of ``(A^T A + alpha I) x = A^T y + alpha z`` in ``O(N log N)``, with ``A^T A`` inverted by the
Woodbury identity on the ``s^2`` spectral aliases (Zhao et al. 2016, the USRNet paper's eq. 7).

Images are real ``(B, C, H, W)`` tensors; the high-resolution size must be a multiple of the scale
(the low-resolution image has ``H / s x W / s`` pixels). The kernel is a buffer, so ``.to(device)``
moves the operator.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..errors import SpadeError
from ..physics import Physics, random_quarter_turns, rotate_images

SCALES = (1, 2, 3, 4)
KERNEL_SUM_TOL = 1e-3  # a kernel's weights must sum to one within this (the 12 kernels: < 1e-6)


def check_scale(scale) -> int:
    if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or int(scale) not in SCALES:
        raise SpadeError(f"scale factor must be one of {', '.join(map(str, SCALES))}, got {scale!r}")
    return int(scale)


def check_kernel(kernel, image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """A blur kernel as a float64 ``(kh, kw)`` tensor: 2-D, finite, weights summing to one
    (within :data:`KERNEL_SUM_TOL`), and, given the high-resolution ``image_size``, no larger than it."""
    k = torch.as_tensor(np.asarray(kernel) if not torch.is_tensor(kernel) else kernel).detach().to(torch.float64)
    if k.dim() == 4 and k.shape[:2] == (1, 1):
        k = k[0, 0]
    if k.dim() != 2 or min(k.shape) < 1:
        raise SpadeError(f"blur kernel must be a 2-D array, got shape {tuple(k.shape)}")
    if not torch.isfinite(k).all():
        raise SpadeError("blur kernel has non-finite values")
    total = float(k.sum())
    if abs(total - 1.0) > KERNEL_SUM_TOL:
        raise SpadeError(f"blur kernel must be normalised (sum 1), its weights sum to {total:.6g}")
    if image_size is not None and (k.shape[0] > image_size[0] or k.shape[1] > image_size[1]):
        raise SpadeError(
            f"blur kernel of {k.shape[0]} x {k.shape[1]} is larger than the {image_size[0]} x {image_size[1]} image"
        )
    return k


def kernel_otf(kernel: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The optical transfer function of a ``(..., kh, kw)`` kernel on an ``H x W`` grid: the kernel
    zero-padded to ``H x W``, its centre ``(kh // 2, kw // 2)`` rolled to ``(0, 0)``, 2-D FFT.
    Multiplying by it is the circular convolution ``scipy.ndimage.convolve(..., mode="wrap")``
    computes for odd-sized kernels (tested)."""
    kh, kw = kernel.shape[-2:]
    pad = torch.zeros(*kernel.shape[:-2], *shape, dtype=kernel.dtype, device=kernel.device)
    pad[..., :kh, :kw] = kernel
    pad = torch.roll(pad, shifts=(-(kh // 2), -(kw // 2)), dims=(-2, -1))
    return torch.fft.fft2(pad)


def downsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """The standard s-fold downsampler: keep pixel ``(0, 0)`` of every ``s x s`` block."""
    return x[..., ::scale, ::scale]


def upsample_zeros(y: torch.Tensor, scale: int) -> torch.Tensor:
    """``S^T``: the low-resolution pixels at ``(0, 0)`` of every ``s x s`` block, zeros elsewhere
    (a pad, no in-place indexing)."""
    b, c, h, w = y.shape
    z = nn.functional.pad(y.reshape(b, c, h, 1, w, 1), (0, scale - 1, 0, 0, 0, scale - 1))
    return z.reshape(b, c, h * scale, w * scale)


def _alias_mean(spec: torch.Tensor, scale: int) -> torch.Tensor:
    """Mean of the ``s^2`` spectral aliases: ``(.., H, W) -> (.., H/s, W/s)`` (frequency ``(i, j)``
    of the low-resolution grid gathers ``(i + a H/s, j + b W/s)``)."""
    *lead, h, w = spec.shape
    # Two single-axis sums, not one mean over both axes: 10x faster for complex tensors on the CPU.
    return spec.reshape(*lead, scale, h // scale, scale, w // scale).sum(dim=-4).sum(dim=-2) / scale**2


class DataTerms(NamedTuple):
    """:meth:`SRPhysics.data_terms`: ``F(k)``, ``conj(F(k)) F(S^T y)`` and ``mean_s |F(k)|^2``."""

    fb: torch.Tensor
    fbfy: torch.Tensor
    f2b: torch.Tensor


class SRPhysics(Physics):
    """``A = S H``: blur with ``kernel`` (circular), keep every ``scale``-th pixel from ``(0, 0)``.

    ``kernel``: ``(kh, kw)`` (one for the batch) or ``(B, 1, kh, kw)`` (one per sample), each
    normalised; ``noise_level``: the noise standard deviation of ``y`` on the ``[0, 1]`` intensity
    scale (USRNet's ``sigma`` input; 0 for the official test), a float or a ``(B,)`` tensor.
    """

    def __init__(self, kernel, scale: int, noise_level=0.0):
        super().__init__()
        self.scale = check_scale(scale)
        k = torch.as_tensor(kernel) if not torch.is_tensor(kernel) else kernel
        ks = [check_kernel(k)] if k.dim() != 4 or k.shape[0] == 1 else [check_kernel(ki[0]) for ki in k]
        kernels = torch.stack(ks).unsqueeze(1)  # (B or 1, 1, kh, kw)
        self.register_buffer("kernel", kernels.to(torch.float32))
        sigma = torch.as_tensor(noise_level, dtype=torch.float32).reshape(-1)
        if not torch.isfinite(sigma).all() or (sigma < 0).any():
            raise SpadeError(f"noise level must be a non-negative number, got {noise_level!r}")
        self.register_buffer("noise_level", sigma)
        self._otf_cache: tuple | None = None

    # -- the operator ------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, hr: bool) -> tuple[int, int]:
        if x.dim() != 4 or torch.is_complex(x):
            raise SpadeError(f"expected a real (B, C, H, W) image, got {tuple(x.shape)} {x.dtype}")
        h, w = x.shape[-2:]
        if not hr:
            h, w = h * self.scale, w * self.scale
        elif h % self.scale or w % self.scale:
            raise SpadeError(f"high-resolution size {h} x {w} is not a multiple of the scale {self.scale}")
        kh, kw = self.kernel.shape[-2:]
        if kh > h or kw > w:
            raise SpadeError(f"blur kernel of {kh} x {kw} is larger than the {h} x {w} image")
        if self.kernel.shape[0] not in (1, x.shape[0]):
            raise SpadeError(f"{self.kernel.shape[0]} kernels for a batch of {x.shape[0]} images")
        return h, w

    def otf(self, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``F(k)`` on the high-resolution grid, ``(B or 1, 1, H, W)`` complex; cached per shape."""
        key = (tuple(shape), dtype, self.kernel.device, self.kernel.data_ptr())
        if self._otf_cache is None or self._otf_cache[0] != key:
            self._otf_cache = (key, kernel_otf(self.kernel.to(dtype), tuple(shape)))
        return self._otf_cache[1]

    def blur(self, x: torch.Tensor) -> torch.Tensor:
        """``H x``: circular convolution with the kernel."""
        fb = self.otf(x.shape[-2:], x.dtype)
        return torch.fft.ifft2(fb * torch.fft.fft2(x)).real

    def A(self, x: torch.Tensor) -> torch.Tensor:
        """High-resolution ``(B, C, H, W)`` -> low-resolution ``(B, C, H/s, W/s)``."""
        self._check(x, hr=True)
        return downsample(self.blur(x), self.scale)

    def A_adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``H^T S^T y``: zero-filled upsampling, then correlation with the kernel."""
        self._check(y, hr=False)
        up = upsample_zeros(y, self.scale)
        fb = self.otf(up.shape[-2:], up.dtype)
        return torch.fft.ifft2(fb.conj() * torch.fft.fft2(up)).real

    # -- the closed-form data step ------------------------------------------------------------
    def data_terms(self, y: torch.Tensor) -> DataTerms:
        """What every data step of one low-resolution ``y`` shares (the official code computes
        them once per forward pass): ``F(k)``, ``conj(F(k)) F(S^T y)`` and ``mean_s |F(k)|^2``."""
        self._check(y, hr=False)
        up = upsample_zeros(y, self.scale)
        fb = self.otf(up.shape[-2:], up.dtype)
        return DataTerms(fb, fb.conj() * torch.fft.fft2(up), _alias_mean(fb.abs().pow(2), self.scale))

    def data_step(self, z: torch.Tensor, y: torch.Tensor, alpha: torch.Tensor | float,
                  terms: DataTerms | None = None) -> torch.Tensor:
        """``argmin_x ||y - A x||^2 + alpha ||x - z||^2`` = ``(A^T A + alpha I)^-1 (A^T y + alpha z)``.

        ``alpha``: a float or a tensor broadcasting to ``(B, 1, 1, 1)``, positive; ``terms``:
        :meth:`data_terms` of this ``y`` (computed here when not given). With ``FB = F(k)`` and
        ``R = conj(FB) F(S^T y) + alpha F(z)`` the solution is
        ``F^-1[(R - conj(FB) * up_s(mean_s(FB R) / (mean_s(|FB|^2) + alpha))) / alpha]``, where
        ``mean_s`` averages the ``s^2`` aliases of a frequency and ``up_s`` tiles them back.
        """
        h, w = self._check(z, hr=True)
        if tuple(y.shape[-2:]) != (h // self.scale, w // self.scale):
            raise SpadeError(f"low-resolution image {tuple(y.shape[-2:])} does not match {h} x {w} at scale {self.scale}")
        s = self.scale
        t = terms if terms is not None else self.data_terms(y)
        rhs = torch.fft.fft2(z) * alpha + t.fbfy
        q = _alias_mean(t.fb * rhs, s) / (t.f2b + alpha)  # (B, C, H/s, W/s)
        # conj(FB) * up_s(q), broadcast over the s x s alias blocks instead of tiling q
        fbc = t.fb.conj().reshape(*t.fb.shape[:-2], s, h // s, s, w // s)
        correction = (fbc * q[..., None, :, None, :]).reshape(rhs.shape)
        return torch.fft.ifft2(rhs - correction).real / alpha

    # -- batches ---------------------------------------------------------------------------------
    def sigma(self, batch: int) -> torch.Tensor:
        """The noise level per sample, ``(B,)``."""
        return self.noise_level.expand(batch) if self.noise_level.numel() == 1 else self.noise_level

    def select(self, index) -> "SRPhysics":
        """The operator of a sub-batch (a slice or indices of the batch)."""
        kernel = self.kernel[index] if self.kernel.shape[0] > 1 else self.kernel
        sigma = self.noise_level[index] if self.noise_level.numel() > 1 else self.noise_level
        return SRPhysics(kernel.to(torch.float64), self.scale, sigma)

    def rotate(self, ks: list[int]) -> "SRPhysics":
        """The degradation seen in images rotated by ``ks[b]`` quarter turns (sample ``b``), for
        equivariant imaging: the blur of a rotated scene is the rotated kernel (circular convolution
        commutes with the rotation when the kernel turns with it); the downsampler stays the
        standard one, keeping pixel ``(0, 0)`` of the rotated image, so ``A_phi`` is again a
        degradation of the family the model is trained on. Scale and noise level are unchanged."""
        kernels = [torch.rot90(self.kernel[b if self.kernel.shape[0] > 1 else 0, 0], int(k), dims=(-2, -1))
                   for b, k in enumerate(ks)]
        if len({tuple(k.shape) for k in kernels}) > 1:
            raise SpadeError(f"a {tuple(self.kernel.shape[-2:])} kernel cannot be turned by odd and even quarter turns in one batch")
        return SRPhysics(torch.stack(kernels).unsqueeze(1).to(torch.float64), self.scale, self.noise_level)

    def transform(self, x: torch.Tensor) -> tuple[torch.Tensor, "SRPhysics"]:
        """Equivariant imaging for SR: a random rotation per sample (the kernel turned with it,
        :meth:`rotate`), then one circular shift of the batch by ``(dy, dx)`` in ``[0, scale)``:
        the blur commutes with it and the downsampler then keeps another phase of the scene, so
        ``A_phi = A`` measures the shifted image; torch's global random state."""
        ks = random_quarter_turns(x)
        if self.kernel.shape[-1] != self.kernel.shape[-2]:  # one parity of turns for the batch's kernels
            ks = [ks[0]] * len(ks)
        x_phi, physics = rotate_images(x, ks), self.rotate(ks)
        shifts = torch.randint(0, self.scale, (2,)).tolist()
        return torch.roll(x_phi, shifts, dims=(-2, -1)), physics

    def extra_repr(self) -> str:
        return f"scale={self.scale}, kernels={tuple(self.kernel.shape)}"
