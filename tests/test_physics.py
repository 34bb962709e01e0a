"""The MRI operator: adjointness, the data-step gradient, and parity with fastMRI's FFT and masks."""

import fastmri
import numpy as np
import pytest
import torch
from fastmri.data.subsample import EquispacedMaskFractionFunc

from spade_deploy.errors import SpadeError
from spade_deploy.mri.physics import (MultiCoilMRI, channels_to_complex, complex_to_channels, equispaced_mask, fft2c, ifft2c)


def crandn(*shape: int, dtype=torch.complex64, gen: torch.Generator | None = None) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, generator=gen)


def random_physics(b=2, c=4, h=12, w=10, dtype=torch.complex64, seed=0) -> MultiCoilMRI:
    g = torch.Generator().manual_seed(seed)
    s = crandn(b, c, h, w, dtype=dtype, gen=g)
    s = s / s.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = (torch.rand(b, 1, 1, w, generator=g) < 0.4).to(s.real.dtype)
    mask[..., w // 2] = 1
    return MultiCoilMRI(mask, s)


@pytest.mark.parametrize("dtype,tol", [(torch.complex64, 1e-5), (torch.complex128, 1e-12)])
@pytest.mark.parametrize("shape", [(2, 4, 12, 10), (1, 8, 15, 17)])
def test_adjointness(dtype, tol, shape):
    b, c, h, w = shape
    phys = random_physics(b, c, h, w, dtype=dtype, seed=h)
    g = torch.Generator().manual_seed(1)
    x, y = crandn(b, h, w, dtype=dtype, gen=g), crandn(b, c, h, w, dtype=dtype, gen=g)
    lhs = torch.vdot(phys.A(x).flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), phys.A_adjoint(y).flatten())
    assert abs(lhs - rhs) <= tol * abs(lhs)


def test_one_dimensional_mask_broadcasts():
    phys = random_physics()
    mask = phys.mask[0].flatten()
    one = MultiCoilMRI(mask, phys.smaps)
    x = crandn(2, 12, 10)
    torch.testing.assert_close(one.A(x), phys.mask[0] * fft2c(phys.smaps * x.unsqueeze(1)))


def test_bad_operator_input():
    with pytest.raises(SpadeError, match="complex"):
        MultiCoilMRI(torch.ones(10), torch.ones(1, 2, 8, 10))
    with pytest.raises(SpadeError, match="does not match"):
        MultiCoilMRI(torch.ones(9), crandn(1, 2, 8, 10))


def test_grad_is_the_gradient_of_the_data_term():
    phys = random_physics(dtype=torch.complex128, seed=3)
    g = torch.Generator().manual_seed(2)
    noise = 0.1 * crandn(2, 4, 12, 10, dtype=torch.complex128, gen=g)
    y = phys.A(crandn(2, 12, 10, dtype=torch.complex128, gen=g)) + noise
    xr = torch.randn(2, 12, 10, dtype=torch.float64, generator=g, requires_grad=True)
    xi = torch.randn(2, 12, 10, dtype=torch.float64, generator=g, requires_grad=True)
    loss = 0.5 * (phys.A(torch.complex(xr, xi)) - y).abs().pow(2).sum()
    gr, gi = torch.autograd.grad(loss, (xr, xi))
    grad = phys.grad(torch.complex(xr, xi).detach(), y)
    torch.testing.assert_close(grad.real, gr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad.imag, gi, rtol=1e-10, atol=1e-10)


def test_normalised_maps_and_full_mask_give_an_isometry():
    phys = random_physics(dtype=torch.complex128)
    full = MultiCoilMRI(torch.ones_like(phys.mask), phys.smaps)
    x = crandn(2, 12, 10, dtype=torch.complex128)
    torch.testing.assert_close(full.A_adjoint(full.A(x)), x)
    assert full.A(x).norm() == pytest.approx(float(x.norm()), rel=1e-12)


@pytest.mark.parametrize("shape", [(3, 2, 16, 16), (2, 15, 17), (1, 4, 9, 12)])
def test_fft_matches_fastmri(shape):
    x = crandn(*shape, gen=torch.Generator().manual_seed(len(shape)))
    ref_k = torch.view_as_complex(fastmri.fft2c(torch.view_as_real(x).contiguous()))
    ref_x = torch.view_as_complex(fastmri.ifft2c(torch.view_as_real(x).contiguous()))
    torch.testing.assert_close(fft2c(x), ref_k, rtol=0, atol=1e-6)
    torch.testing.assert_close(ifft2c(x), ref_x, rtol=0, atol=1e-6)
    torch.testing.assert_close(ifft2c(fft2c(x)), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("num_cols", [160, 368, 320, 99, 64])
@pytest.mark.parametrize("acceleration,center_fraction", [(4, 0.08), (6, 0.08), (8, 0.04), (10, 0.04), (10, 0.08)])
@pytest.mark.parametrize("seed", [0, 42, tuple(map(ord, "file_brain_AXT2_200_6002217.h5"))])
def test_equispaced_mask_matches_fastmri(num_cols, acceleration, center_fraction, seed):
    ref, num_low = EquispacedMaskFractionFunc([center_fraction], [acceleration])((1, num_cols, 2), seed=seed)
    ours = equispaced_mask(num_cols, center_fraction, acceleration, seed=seed)
    np.testing.assert_array_equal(ours, ref.numpy().reshape(-1))
    assert ours.dtype == np.float32
    assert num_low == round(num_cols * center_fraction)


def test_equispaced_mask_with_explicit_offset_matches_fastmri():
    for offset in range(4):
        ref, _ = EquispacedMaskFractionFunc([0.08], [6])((1, 160, 2), offset=offset, seed=0)
        np.testing.assert_array_equal(equispaced_mask(160, 0.08, 6, offset=offset), ref.numpy().reshape(-1))


def test_equispaced_mask_rejects_impossible_settings():
    with pytest.raises(SpadeError, match="acceleration"):
        equispaced_mask(160, 0.08, 1)
    with pytest.raises(SpadeError, match="center fraction"):
        equispaced_mask(160, 0.2, 6)


def test_channel_conversion_round_trip():
    x = crandn(2, 5, 6)
    c = complex_to_channels(x)
    assert c.shape == (2, 2, 5, 6) and not torch.is_complex(c)
    torch.testing.assert_close(channels_to_complex(c), x)


@pytest.mark.parametrize("shape,per_slice", [((160, 160), False), ((162, 96), True), ((161, 96), False),
                                             ((96, 161), True), ((98, 160), False)])
def test_grad_without_shifts_equals_fastmri_centred_form(shape, per_slice):
    """The data-term gradient the DEQ iterates (one-dimensional FFTs along the columns without
    shifts, A^H y once per measurement) is A^H(Ax - y) with fastMRI's centred 2-D FFT, on even and
    odd sizes, one mask or one per slice, and follows a measurement changed in place (its cached
    A^H y is refreshed)."""
    h, w = shape
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 4, h, w, dtype=torch.complex64, generator=g)
    maps = maps / (maps.abs() ** 2).sum(1, keepdim=True).sqrt()
    mask = (torch.rand(2, 1, 1, w, generator=g) if per_slice else torch.rand(w, generator=g)) > 0.6
    physics = MultiCoilMRI(mask.float(), maps)
    x = torch.randn(2, h, w, dtype=torch.complex64, generator=g)
    y = physics.A(torch.randn(2, h, w, dtype=torch.complex64, generator=g))

    def reference(x, y):
        k = fastmri.fft2c(torch.view_as_real(maps * x.unsqueeze(1)))
        r = torch.view_as_complex(fastmri.ifft2c(physics.mask.unsqueeze(-1) * (physics.mask.unsqueeze(-1) * k - torch.view_as_real(y))))
        return (maps.conj() * r).sum(1)

    for _ in range(2):
        ref, got = reference(x, y), physics.grad(x, y)
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
        y.mul_(-2.0)
    # gradients reach a measurement that needs them, as through the centred form
    yg = y.clone().requires_grad_(True)
    with torch.no_grad():
        physics.grad(x, yg)  # a solve caches A^H y without a graph ...
    (g_ref,) = torch.autograd.grad(reference(x, yg).abs().pow(2).sum(), yg)
    (g_got,) = torch.autograd.grad(physics.grad(x, yg).abs().pow(2).sum(), yg)  # ... not used here
    assert (g_got - g_ref).abs().max() <= 1e-4 * g_ref.abs().max()
