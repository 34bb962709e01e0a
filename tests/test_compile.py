"""The GPU bench's ``compiled-whole`` engine (``benchmarks/gpu_bench.py``: ``compiled_whole``): a
DEQ's whole iteration and a VarNet's whole forward pass (every cascade) are each one graph under
``torch.compile(fullgraph=True)`` (a graph break is an error), the same graph for every measurement
operator of one shape (no recompilation per slice), and they reconstruct as the eager model does.

Graph capture is checked with the ``aot_eager`` back-end: dynamo and AOT autograd as inductor runs
them, no code generation, so no C++ compiler and nothing written to disk. An inductor compile of
the tiny DEQ's iteration is left out: 53 s on the 2-core CPU, and torch writes its precompiled
headers under ``$TMPDIR/torchinductor_<user>`` whatever ``TORCHINDUCTOR_CACHE_DIR`` says; on the
GPU, inductor generates Triton code, which no CPU run would check anyway."""

import importlib.util
from pathlib import Path

import pytest
import torch

from spade_deploy.models import build_model
from spade_deploy.mri.physics import MultiCoilMRI
from spade_deploy.solvers import SolverConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE, COILS = 24, 4
SOLVER = SolverConfig(max_iter=6, tol=1e-6, resident=True)  # the CUDA default loop: whole batch per iteration


def _gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _problem(seed: int, n: int = 2):
    """A measurement and its operator: coil maps and the mask's offset differ with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    smaps = torch.randn(n, COILS, SIZE, SIZE, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = torch.zeros(SIZE)
    mask[seed % 3 :: 3] = 1
    mask[SIZE // 2 - 3 : SIZE // 2 + 3] = 1
    physics = MultiCoilMRI(mask, smaps)
    return physics.A(torch.randn(n, SIZE, SIZE, dtype=torch.complex64, generator=g)), physics


def _counted(bench):
    count = [0]
    return bench.counting_backend("aot_eager", count), count


def _reconstructions(model, seeds=(1, 2, 3)):
    with torch.no_grad():
        return [model(*_problem(s), solver=SOLVER) if model.solver_cfg is not None else model(*_problem(s))
                for s in seeds]


def test_deq_iteration_is_one_graph_for_every_operator_of_a_shape():
    bench = _gpu_bench()
    torch.manual_seed(0)
    model = build_model("deq", preset="tiny").eval()
    backend, graphs = _counted(bench)
    whole = bench.compiled_whole(model, backend)
    got = _reconstructions(whole)  # three operators (maps, masks, measurements) of one shape
    assert graphs[0] == 1  # one graph (fullgraph), compiled once: no recompilation per operator
    ref = _reconstructions(model)
    assert whole.solve_info().iterations.tolist() == model.solve_info().iterations.tolist()
    for a, b in zip(got, ref):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()
    assert model.iteration is not whole.iteration  # the caller's model is not compiled


@pytest.mark.parametrize("name", ["varnet", "e2e-varnet"])
def test_varnet_forward_is_one_graph_for_every_operator_of_a_shape(name):
    bench = _gpu_bench()
    torch.manual_seed(0)
    model = build_model(name, preset="tiny").eval()
    backend, graphs = _counted(bench)
    whole = bench.compiled_whole(model, backend)
    got = _reconstructions(whole)
    assert graphs[0] == 1  # every cascade (and E2E's sensitivity network) in one graph, compiled once
    for a, b in zip(got, _reconstructions(model)):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_a_graph_break_is_an_error_not_a_split():
    """fullgraph=True is what makes the counts above mean one graph: a prior that breaks the graph
    fails the engine (listed as failed in the bench) instead of running as several graphs."""

    class Breaking(torch.nn.Module):
        def forward(self, x):
            torch._dynamo.graph_break()
            return x

    bench = _gpu_bench()
    model = build_model("deq", preset="tiny").eval()
    model.prior = Breaking()
    backend, graphs = _counted(bench)
    with pytest.raises(Exception, match="(?i)graph.break"):
        _reconstructions(bench.compiled_whole(model, backend), seeds=(1,))
    assert graphs[0] == 0
