"""One training job over several processes: ``torch.distributed`` as ``torchrun`` starts it.

``torchrun --nproc_per_node N [--nnodes M --rdzv-endpoint HOST:PORT ...] $(which spade) train|finetune ...``
sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` in each process; :func:`context`
joins the process group from them (gloo on CPU, NCCL on CUDA, where ``--device cuda`` means the
process's own GPU, ``cuda:LOCAL_RANK``). Without them (a plain ``spade`` run) the job is one process
and every collective here returns its input.

The trainer keeps the model unwrapped (its training hooks are its own methods) and averages the
gradients itself (:meth:`Context.reduce_gradients`): every rank ends each step with the same
gradients, hence the same weights. Each global batch is split in contiguous shares
(:func:`share`); each sample's random draws come from its own seed (:func:`seed_sample`), so a
run's result does not depend on how many processes share it.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist

from .errors import SpadeError


@dataclass(frozen=True)
class Context:
    """This process's place in the job: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """Whether this process writes the run's files and tells the user (rank 0)."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks (every rank gets the sum)."""
        if self.active:
            values = values.clone()
            tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
        return values

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (the job starts from one model)."""
        if self.active:
            with torch.no_grad():
                for t in (*module.parameters(), *module.buffers()):
                    tdist.broadcast(t.data, src=0)

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the ranks' gradients of ``params`` in one flat all-reduce (each rank accumulated its
        samples' gradients, already divided by the global batch size, so the sum is the mean over
        the global batch). A parameter no rank gave a gradient keeps ``None`` (the optimiser skips
        it, as in a one-process run); one that only some ranks reached gets the others' zeros."""
        if not self.active or not params:
            return
        ref = params[0]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                         + [torch.tensor([float(p.grad is not None) for p in params], dtype=ref.dtype, device=ref.device)])
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        used = flat[-len(params):]
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone() if used[i] > 0 else None
            offset += n


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise SpadeError(f"${name} is {raw!r}, not an integer (torchrun sets it)") from None


def launched() -> tuple[int, int, int]:
    """``(rank, world size, local rank)`` as torchrun set them; ``(0, 1, 0)`` outside torchrun."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise SpadeError(f"$RANK {rank} / $WORLD_SIZE {world} / $LOCAL_RANK {local} do not describe a job")
    return rank, world, local


def is_main() -> bool:
    """Whether this process is rank 0 (the one that writes and reports; any plain run)."""
    return launched()[0] == 0


def device_for(device: str | None) -> torch.device:
    """The device this process trains on: ``cuda`` under torchrun is ``cuda:LOCAL_RANK`` (one GPU
    per process); ``cpu``, ``cuda:N`` and a plain run's ``cuda`` as given."""
    if device is None or device == "cpu":
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpadeError(f"unknown device {device!r} (cpu | cuda | cuda:N)") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise SpadeError(f"--device {device}: no CUDA GPU is visible here")
    if dev.index is None:
        rank, world, local = launched()
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise SpadeError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) on this node "
                         f"(LOCAL_RANK {launched()[2]})")
    torch.cuda.set_device(dev)
    return dev


def context(device: str | None = None) -> Context:
    """This process's :class:`Context`, joining torchrun's process group on first use (gloo, or
    NCCL when training on CUDA)."""
    rank, world, local = launched()
    dev = device_for(device)
    if world > 1 and not tdist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "MASTER_ADDR" not in os.environ:
            raise SpadeError(f"$WORLD_SIZE is {world} but $MASTER_ADDR is unset: start several processes with torchrun")
        tdist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    if world > 1 and tdist.get_world_size() != world:
        raise SpadeError(f"the process group has {tdist.get_world_size()} processes, $WORLD_SIZE says {world}")
    return Context(rank=rank, world=world, local_rank=local, device=dev)


def share(batch: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of a global batch: sizes differ by at most one, the first
    ranks take the larger shares (a short last batch leaves the last ranks fewer, or none)."""
    q, r = divmod(len(batch), world)
    start = rank * q + min(rank, r)
    return batch[start:start + q + (1 if rank < r else 0)]


def sample_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the run's seed, the epoch, the step, the sample)."""
    return int(np.random.SeedSequence([p % 2**32 for p in parts] + [len(parts)]).generate_state(2, np.uint64)[0] >> 1)


def seed_sample(*parts: int) -> None:
    """Seed the global random states (python, NumPy, torch) for one sample's draws: what the
    task's fresh measurements, a loss's random transformation and the model's penalty draw from."""
    s = sample_seed(*parts)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
