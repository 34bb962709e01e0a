"""Fixed-point solvers: per-sample stopping rule, Anderson acceleration."""

import pytest
import torch

from spade_deploy.solvers import SolverConfig, solve


def _affine_contraction(rates):
    """T(x) = a * x + b per sample; fixed point b / (1 - a)."""
    a = torch.tensor(rates).view(-1, 1)
    b = torch.linspace(1, 2, 16).view(1, -1)
    return (lambda x, idx=None: (a if idx is None else a[idx]) * x + b), b / (1 - a)


@pytest.mark.parametrize("method", ["fixed-point", "anderson"])
def test_solvers_reach_the_fixed_point_under_tolerance(method):
    T, x_star = _affine_contraction([0.5, 0.9])
    x, info = solve(T, torch.zeros(2, 16), SolverConfig(method=method, max_iter=500, tol=1e-6))
    assert bool(info.converged.all())
    assert torch.allclose(x, x_star, rtol=1e-4)
    if method == "fixed-point":  # the more contractive sample stops earlier
        assert info.iterations[0] < info.iterations[1]


def test_anderson_needs_fewer_iterations_than_plain_iteration():
    T, _ = _affine_contraction([0.95, 0.97])
    _, plain = solve(T, torch.zeros(2, 16), SolverConfig(method="fixed-point", max_iter=1000, tol=1e-6))
    _, anders = solve(T, torch.zeros(2, 16), SolverConfig(method="anderson", max_iter=1000, tol=1e-6))
    assert bool(anders.converged.all())
    assert int(anders.iterations.max()) * 3 < int(plain.iterations.max())


def test_cap_is_reported_as_not_converged():
    T, _ = _affine_contraction([0.99, 0.99])
    _, info = solve(T, torch.zeros(2, 16), SolverConfig(method="fixed-point", max_iter=5, tol=1e-8))
    assert info.iterations.tolist() == [5, 5]
    assert not bool(info.converged.any())
