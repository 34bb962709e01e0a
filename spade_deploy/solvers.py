"""Fixed-point solvers for deep-equilibrium reconstructors.

Both solvers work on a batch and apply the stopping rule per sample: sample ``b`` stops at the
first ``k`` with ``||x_{k+1} - x_k|| / ||x_k|| < tol`` (or at ``max_iter``); a stopped sample is
frozen and no longer computed while the others go on, so a batch gives the same iterates as one
slice at a time and costs the sum of its samples' iterations, not the slowest one's times the batch.

Two ways to run that rule, with the same iterates and per-sample iteration counts:

* sub-batch (the CPU default): each iteration computes only the samples still iterating. Finding
  them is a host decision per iteration (``nonzero``), cheap on a CPU where arithmetic dominates.
* device-resident (the CUDA default; ``SolverConfig.resident=True`` anywhere): every iteration
  computes the whole batch and ``torch.where`` keeps each stopped sample at exactly the iterate it
  stopped on, so an iteration holds no host synchronisation and can be captured as a CUDA graph or
  compiled whole; the host asks "has every sample stopped?" once every ``check_every`` iterations
  (:attr:`SolveInfo.host_checks` counts those questions). Anderson's small solve is
  ``torch.linalg.solve_ex`` on the CPU and an elementwise elimination (:func:`spd_solve`) on CUDA,
  where ``solve_ex`` may still read the library's status back to the host. Extra iterations after the last sample
  stopped change nothing but cost time: at most ``check_every - 1`` of them.

A precision schedule (``SolverConfig.precision``, a :class:`PrecisionSchedule`) runs each sample
first with the priors in low precision (bf16 / fp16), then in FP32 to the tolerance: the low phase
of a sample ends at its own switch residual, or where it stalls above it, and its Anderson history
restarts in FP32. Only an FP32 iteration can stop a sample, so the stopping rule and the fixed point
are FP32's; the iteration counts are the sum of both phases (``SolveInfo.low_precision_iterations``
says how many ran in low precision). The solver says which phase a call of ``T`` is in through
:func:`precision_phase`, read by the priors (:class:`spade_deploy.deploy.priors.PrecisionPrior`):
the model's loop does not change.
"""

from __future__ import annotations

import contextlib
import contextvars
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


LOW_PRECISIONS = ("bf16", "fp16")


@dataclass(frozen=True)
class PrecisionSchedule:
    """Low precision first, FP32 to the tolerance (module docstring).

    A sample in the low phase hands over to FP32 at the first iteration whose relative residual is
    below ``switch`` (or below the tolerance), or once ``stall`` low-precision iterations in a row
    have not brought its residual below 0.9 times its best so far: a low phase that stalls above
    its switch point never runs on to the cap."""

    low: str = "bf16"
    switch: float = 5e-3
    stall: int = 5

    def __post_init__(self):
        if self.low not in LOW_PRECISIONS:
            raise SolverConfigError(f"unknown low precision {self.low!r} ({' | '.join(LOW_PRECISIONS)})")
        if not (isinstance(self.switch, (int, float)) and not isinstance(self.switch, bool)
                and math.isfinite(self.switch) and MIN_TOL <= self.switch < 1.0):
            raise SolverConfigError(f"precision switch residual must be a finite number in [{MIN_TOL:g}, 1), got {self.switch!r}")
        if isinstance(self.stall, bool) or not isinstance(self.stall, int) or not 1 <= self.stall <= MAX_ITER:
            raise SolverConfigError(f"precision stall must be an integer in [1, {MAX_ITER}], got {self.stall!r}")

    @property
    def label(self) -> str:
        """What a table or manifest shows, e.g. ``bf16->fp32 @ 0.005``."""
        return f"{self.low}->fp32 @ {self.switch:g}"


_PHASE: contextvars.ContextVar[str | None] = contextvars.ContextVar("spade_precision_phase", default=None)


@contextlib.contextmanager
def precision_phase(low: str | None):
    """Calls of ``T`` inside run their priors in ``low`` precision (None: FP32)."""
    token = _PHASE.set(low)
    try:
        yield
    finally:
        _PHASE.reset(token)


def current_precision() -> str | None:
    """The low precision the solver asks for now (None: FP32, also outside any solve)."""
    return _PHASE.get()


@dataclass(frozen=True)
class SolverConfig:
    method: str = "anderson"  # "anderson" | "fixed-point"
    max_iter: int = 100
    tol: float = 1e-4
    anderson_m: int = 5
    anderson_beta: float = 1.0
    anderson_lam: float = 1e-4
    # None: device-resident on CUDA, sub-batch elsewhere (module docstring).
    resident: bool | None = None
    check_every: int = 8  # device-resident: iterations between the host's stopping checks
    precision: PrecisionSchedule | None = None  # None: FP32 throughout

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
        if isinstance(self.check_every, bool) or not isinstance(self.check_every, int) or self.check_every < 1:
            raise SolverConfigError(f"solver check_every must be an integer >= 1, got {self.check_every!r}")


@dataclass
class SolveInfo:
    iterations: torch.Tensor  # (B,) iterations each sample ran
    residual: torch.Tensor  # (B,) last relative step ||x_{k+1}-x_k|| / ||x_k||
    converged: torch.Tensor  # (B,) bool: residual < tol before the cap
    host_checks: int = 0  # stopping decisions read back by the host (each one a device synchronisation on a GPU)
    resident: bool = False  # which of the two ways ran (module docstring)
    # (B,) iterations each sample ran in low precision (included in ``iterations``); None: FP32 only.
    low_precision_iterations: torch.Tensor | None = None
    precision: str = "fp32"  # the schedule that ran (PrecisionSchedule.label) or "fp32"


def _host_all(flags: torch.Tensor) -> bool:
    """The host's one question to the device: are all ``flags`` set? (A synchronisation on CUDA.)"""
    return bool(flags.all())


def solve(T: Operator, x0: torch.Tensor, cfg: SolverConfig) -> tuple[torch.Tensor, SolveInfo]:
    """Iterate ``x <- T(x)`` (plain or Anderson-mixed) until the relative fixed-point residual
    ``||T(x_k) - x_k|| / ||x_k||`` falls below ``cfg.tol`` for every sample, or ``cfg.max_iter``.

    For the plain iteration that residual is exactly the relative step ``||x_{k+1} - x_k|| / ||x_k||``.
    Returns ``T(x_k)`` at the stopping iterate and the per-sample bookkeeping.
    """
    resident = cfg.resident if cfg.resident is not None else x0.device.type == "cuda"
    if cfg.precision is not None:
        return _solve_scheduled(T, x0, cfg, resident)
    if resident:
        return _solve_resident(T, x0, cfg)
    b = x0.shape[0]
    shape = x0.shape
    checks = 0
    x = x0.reshape(b, -1)
    out = x
    iters = torch.zeros(b, dtype=torch.long, device=x0.device)
    res = torch.full((b,), float("inf"), device=x0.device)
    done = torch.zeros(b, dtype=torch.bool, device=x0.device)
    hist_x: list[torch.Tensor] = []
    hist_f: list[torch.Tensor] = []
    for _ in range(cfg.max_iter):
        active = ~done
        checks += 1
        if _host_all(active):
            fx = T(x.reshape(shape)).reshape(b, -1)
        else:  # only the samples still iterating; the stopped ones keep their last value
            idx = active.nonzero().squeeze(1)
            fx = out.clone()
            fx[idx] = T(x[idx].reshape(-1, *shape[1:]), idx).reshape(idx.numel(), -1)
        out = torch.where(active[:, None], fx, out)
        iters, res, done = _record(x, fx, active, iters, res, done, cfg.tol)
        checks += 1
        if _host_all(done):
            break
        x = _next_iterate(x, fx, done, hist_x, hist_f, cfg)
    return out.reshape(shape), SolveInfo(iters, res, res < cfg.tol, host_checks=checks)


def _solve_resident(T: Operator, x0: torch.Tensor, cfg: SolverConfig) -> tuple[torch.Tensor, SolveInfo]:
    """The device-resident loop (module docstring): the same rule as :func:`solve`'s sub-batch
    loop, on the whole batch every iteration, the stop read by the host every ``check_every``
    iterations only. ``T`` is called without an index (the whole batch)."""
    b = x0.shape[0]
    shape = x0.shape
    x = x0.reshape(b, -1)
    out = torch.zeros_like(x)
    iters = torch.zeros(b, dtype=torch.long, device=x0.device)
    res = torch.full((b,), float("inf"), dtype=x.dtype, device=x0.device)
    done = torch.zeros(b, dtype=torch.bool, device=x0.device)
    hist_x: list[torch.Tensor] = []
    hist_f: list[torch.Tensor] = []
    checks = 0
    for k in range(cfg.max_iter):
        active = ~done
        # A stopped sample's T(x) is recomputed from its frozen x and then discarded: its output,
        # residual and count stay those of the iteration it stopped on.
        fx = torch.where(active[:, None], T(x.reshape(shape)).reshape(b, -1), out)
        out = fx
        iters, res, done = _record(x, fx, active, iters, res, done, cfg.tol)
        if (k + 1) % cfg.check_every == 0 or k + 1 == cfg.max_iter:
            checks += 1
            if _host_all(done):
                break
        x = _next_iterate(x, fx, done, hist_x, hist_f, cfg)
    return out.reshape(shape), SolveInfo(iters, res, res < cfg.tol, host_checks=checks, resident=True)


def _solve_scheduled(T: Operator, x0: torch.Tensor, cfg: SolverConfig, resident: bool) -> tuple[torch.Tensor, SolveInfo]:
    """Both loops under a precision schedule (module docstring). Sub-batch: each iteration calls
    ``T`` once per phase on that phase's active samples, and a sample changes phase at the
    iteration that meets its switch rule. Device-resident: ``T`` runs on the whole batch in each
    phase some sample was in at the last host check, and phase changes take effect at the host's
    checks (every ``check_every`` iterations), so no iteration reads the device."""
    sched = cfg.precision
    b, shape = x0.shape[0], x0.shape
    dev = x0.device
    x = x0.reshape(b, -1)
    out = x.clone() if resident else x
    iters = torch.zeros(b, dtype=torch.long, device=dev)
    low_iters = torch.zeros_like(iters)
    res = torch.full((b,), float("inf"), dtype=x.dtype, device=dev)
    best = torch.full_like(res, float("inf"))
    since = torch.zeros_like(iters)  # low-precision iterations since the best residual last fell by 10 %
    counts = torch.zeros_like(iters)  # valid Anderson history entries per sample
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    low = torch.ones(b, dtype=torch.bool, device=dev)
    want = torch.zeros_like(low)  # device-resident: switches decided, applied at the next host check
    phases = {sched.low: True, None: False}  # device-resident: the phases present at the last check
    switch_at = max(sched.switch, cfg.tol)
    hist_x: list[torch.Tensor] = []
    hist_f: list[torch.Tensor] = []
    checks = 0
    for k in range(cfg.max_iter):
        active = ~done
        if resident:
            parts = {}
            for prec, present in phases.items():
                if present:
                    with precision_phase(prec):
                        parts[prec] = T(x.reshape(shape)).reshape(b, -1)
            f_low = parts.get(sched.low, parts.get(None))
            f_full = parts.get(None, f_low)
            fx = torch.where(active[:, None], torch.where(low[:, None], f_low, f_full), out)
        else:
            fx = out.clone()
            for mask, prec in ((active & low, sched.low), (active & ~low, None)):
                idx = mask.nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                with precision_phase(prec):
                    if idx.numel() == b:
                        fx = T(x.reshape(shape)).reshape(b, -1)
                    else:
                        fx[idx] = T(x[idx].reshape(-1, *shape[1:]), idx).reshape(idx.numel(), -1)
            checks += 1  # the host's reading of each phase's active set
        out = fx
        r = (fx - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)
        lo_act = active & low
        iters = iters + active.long()
        low_iters = low_iters + lo_act.long()
        res = torch.where(active, r, res)
        done = done | (active & ~low & (r < cfg.tol))  # FP32's stopping rule: FP32 iterations only
        better = lo_act & (r < 0.9 * best)
        best = torch.where(better, r, best)
        since = torch.where(better, 0, since + lo_act.long())
        switch = lo_act & ((r < switch_at) | (since >= sched.stall))
        if resident:
            want = want | switch
            switch = torch.zeros_like(switch)
            if (k + 1) % cfg.check_every == 0 or k + 1 == cfg.max_iter:
                checks += 1
                low, switch = low & ~want, low & want
                want = torch.zeros_like(want)
                all_done, any_low, any_full = torch.stack([done.all(), (low & ~done).any(), (~low & ~done).any()]).tolist()
                if all_done:
                    break
                phases = {sched.low: any_low, None: any_full}
        else:
            low = low & ~switch
            checks += 1
            if _host_all(done):
                break
        counts = torch.where(switch, 0, (counts + 1).clamp_max(cfg.anderson_m))
        x_next = fx if cfg.method == "fixed-point" else _anderson_mix(x, fx, hist_x, hist_f, cfg, counts)
        x = torch.where(done[:, None], x, x_next)
    return out.reshape(shape), SolveInfo(iters, res, done, host_checks=checks, resident=resident,
                                         low_precision_iterations=low_iters, precision=sched.label)


def _record(x, fx, active, iters, res, done, tol: float):
    """One iteration's bookkeeping, on the device: the relative residual of the samples still
    iterating, their counts, and which have now met the tolerance."""
    r = (fx - x).norm(dim=1) / x.norm(dim=1).clamp_min(1e-12)
    return iters + active.long(), torch.where(active, r, res), done | (r < tol)


def _next_iterate(x, fx, done, hist_x, hist_f, cfg: SolverConfig) -> torch.Tensor:
    """The next iterate (plain or Anderson-mixed); stopped samples keep theirs."""
    x_next = fx if cfg.method == "fixed-point" else _anderson_mix(x, fx, hist_x, hist_f, cfg)
    return torch.where(done[:, None], x, x_next)


def _anderson_mix(x, fx, hist_x, hist_f, cfg: SolverConfig, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Anderson (type II) extrapolation over the last ``m`` iterates (Walker & Ni, 2011).

    ``counts`` (B,): how many of the most recent entries (this one included) each sample may mix,
    its history restarted where fewer (0 or 1: the plain step ``fx``); None: all of them."""
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
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    if counts is None:
        scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-30)[:, None, None]
        gram = gram + cfg.anderson_lam * scale * eye
        ones = torch.ones(G.shape[0], n, 1, dtype=G.dtype, device=G.device)
    else:  # entries outside a sample's history: identity rows, zero right-hand side, zero weight
        valid = torch.arange(n, device=G.device)[None, :] >= (n - counts)[:, None]  # (B, n)
        v = valid.to(G.dtype)
        diag = gram.diagonal(dim1=1, dim2=2)
        scale = ((diag * v).sum(dim=1) / v.sum(dim=1).clamp_min(1)).clamp_min(1e-30)[:, None, None]
        gram = gram * (v[:, :, None] * v[:, None, :]) + cfg.anderson_lam * scale * eye * v[:, :, None] + eye * (1 - v)[:, :, None]
        ones = v[:, :, None].clone()
        ones[:, -1] = 1.0  # the current entry always (a sample with no history: its weight alone, the plain step)
    if G.is_cuda:  # solve_ex may still read cuBLAS's status on the host: elimination in tensor ops
        a = spd_solve(gram, ones)
    else:  # solve_ex: no error check (the Gram matrix is regularised, hence invertible)
        a = torch.linalg.solve_ex(gram, ones)[0]
    alpha = a / a.sum(dim=1, keepdim=True)  # weights summing to one
    if counts is not None:
        alpha = torch.where((counts <= 1)[:, None, None], torch.eye(n, dtype=G.dtype, device=G.device)[-1][None, :, None], alpha)
    mixed_f = (alpha.transpose(1, 2) @ F)[:, 0]
    if cfg.anderson_beta == 1.0:
        return mixed_f
    mixed_x = (alpha.transpose(1, 2) @ X)[:, 0]
    return cfg.anderson_beta * mixed_f + (1 - cfg.anderson_beta) * mixed_x


def spd_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``A x = b`` for a batch of small symmetric positive definite ``A`` (B, n, n), ``b``
    (B, n, k) by Gaussian elimination without pivoting (stable for SPD matrices, as Cholesky is),
    in elementwise tensor operations only: nothing is read back to the host, so it runs inside a
    CUDA graph. ``n`` is Anderson's memory (at most a few)."""
    A, b = A.clone(), b.clone()
    n = A.shape[-1]
    for k in range(n - 1):
        f = A[:, k + 1 :, k : k + 1] / A[:, k : k + 1, k : k + 1]  # (B, n-k-1, 1)
        A[:, k + 1 :, :] -= f * A[:, k : k + 1, :]
        b[:, k + 1 :, :] -= f * b[:, k : k + 1, :]
    x = torch.empty_like(b)
    for k in reversed(range(n)):
        rest = (A[:, k, k + 1 :, None] * x[:, k + 1 :, :]).sum(dim=1)  # (B, k_rhs)
        x[:, k, :] = (b[:, k, :] - rest) / A[:, k, k, None]
    return x
