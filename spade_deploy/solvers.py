"""Fixed-point solvers for deep-equilibrium reconstructors.

Both solvers work on a batch and apply the stopping rule per sample: sample ``b`` stops at the
first ``k`` with ``||x_{k+1} - x_k|| / ||x_k|| < tol`` (or at ``max_iter``); a stopped sample is
frozen and no longer computed while the others go on, so a batch gives the same iterates as one
slice at a time and costs the sum of its samples' iterations, not the slowest one's times the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .errors import SpadeError

# Bounds of a solver's stopping rule: a cap of 10^4 iterations is minutes per slice for the
# paper-size DEQ; a tolerance below 1e-12 is under float32 round-off and would always run to the cap.
MAX_ITER = 10_000
MIN_TOL = 1e-12


class SolverConfigError(SpadeError, ValueError):
    """A solver setting out of its bounds (a ValueError too, for callers that catch that)."""

# ``T(x, idx)``: the iteration of the samples ``idx`` (a LongTensor of batch indices; ``None``: the
# whole batch) applied to ``x``, which holds those samples only.
Operator = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SolverConfig:
    method: str = "anderson"  # "anderson" | "fixed-point"
    max_iter: int = 100
    tol: float = 1e-4
    anderson_m: int = 5
    anderson_beta: float = 1.0
    anderson_lam: float = 1e-4

    def __post_init__(self):
        if self.method not in ("anderson", "fixed-point"):
            raise SolverConfigError(f"unknown solver {self.method!r} (anderson | fixed-point)")
        for name, value, lo, hi in (("max_iter", self.max_iter, 1, MAX_ITER), ("anderson_m", self.anderson_m, 1, 100)):
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise SolverConfigError(f"solver {name} must be an integer in [{lo}, {hi}], got {value!r}")
        for name, value, lo, hi in (("tol", self.tol, MIN_TOL, 1.0), ("anderson_beta", self.anderson_beta, 1e-6, 1.0),
                                    ("anderson_lam", self.anderson_lam, 0.0, 1.0)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not lo <= value <= hi or (name == "tol" and value >= hi):
                raise SolverConfigError(f"solver {name} must be a finite number in [{lo:g}, {hi:g}"
                                        f"{')' if name == 'tol' else ']'}, got {value!r}")


@dataclass
class SolveInfo:
    iterations: torch.Tensor  # (B,) iterations each sample ran
    residual: torch.Tensor  # (B,) last relative step ||x_{k+1}-x_k|| / ||x_k||
    converged: torch.Tensor  # (B,) bool: residual < tol before the cap


def solve(T: Operator, x0: torch.Tensor, cfg: SolverConfig) -> tuple[torch.Tensor, SolveInfo]:
    """Iterate ``x <- T(x)`` (plain or Anderson-mixed) until the relative fixed-point residual
    ``||T(x_k) - x_k|| / ||x_k||`` falls below ``cfg.tol`` for every sample, or ``cfg.max_iter``.

    For the plain iteration that residual is exactly the relative step ``||x_{k+1} - x_k|| / ||x_k||``.
    Returns ``T(x_k)`` at the stopping iterate and the per-sample bookkeeping.
    """
    b = x0.shape[0]
    shape = x0.shape
    x = x0.reshape(b, -1)
    out = x
    iters = torch.zeros(b, dtype=torch.long, device=x0.device)
    res = torch.full((b,), float("inf"), device=x0.device)
    done = torch.zeros(b, dtype=torch.bool, device=x0.device)
    hist_x: list[torch.Tensor] = []
    hist_f: list[torch.Tensor] = []
    for _ in range(cfg.max_iter):
        active = ~done
        if bool(active.all()):
            fx = T(x.reshape(shape)).reshape(b, -1)
        else:  # only the samples still iterating; the stopped ones keep their last value
            idx = active.nonzero().squeeze(1)
            fx = out.clone()
            fx[idx] = T(x[idx].reshape(-1, *shape[1:]), idx).reshape(idx.numel(), -1)
        r = (fx - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)
        iters = iters + active.long()
        res = torch.where(active, r, res)
        out = torch.where(active[:, None], fx, out)
        done = done | (r < cfg.tol)
        if bool(done.all()):
            break
        if cfg.method == "fixed-point":
            x_next = fx
        else:
            x_next = _anderson_mix(x, fx, hist_x, hist_f, cfg)
        x = torch.where(done[:, None], x, x_next)
    return out.reshape(shape), SolveInfo(iters, res, res < cfg.tol)


def _anderson_mix(x, fx, hist_x, hist_f, cfg: SolverConfig) -> torch.Tensor:
    """Anderson (type II) extrapolation over the last ``m`` iterates (Walker & Ni, 2011)."""
    hist_x.append(x)
    hist_f.append(fx)
    if len(hist_x) > cfg.anderson_m:
        hist_x.pop(0)
        hist_f.pop(0)
    if len(hist_x) == 1:
        return fx
    X = torch.stack(hist_x, dim=1)  # (B, n, d)
    F = torch.stack(hist_f, dim=1)
    G = F - X
    n = G.shape[1]
    gram = G @ G.transpose(1, 2)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)[:, None, None]
    gram = gram + cfg.anderson_lam * scale * torch.eye(n, dtype=G.dtype, device=G.device)
    a = torch.linalg.solve(gram, torch.ones(G.shape[0], n, 1, dtype=G.dtype, device=G.device))
    alpha = a / a.sum(dim=1, keepdim=True)  # weights summing to one
    mixed_f = (alpha.transpose(1, 2) @ F)[:, 0]
    if cfg.anderson_beta == 1.0:
        return mixed_f
    mixed_x = (alpha.transpose(1, 2) @ X)[:, 0]
    return cfg.anderson_beta * mixed_f + (1 - cfg.anderson_beta) * mixed_x
