"""Registry, the paper-size DEQ, and the safe checkpoint format."""

import pickle

import pytest
import torch

from spade_deploy.checkpoint import load_model, save_model
from spade_deploy.errors import SpadeError
from spade_deploy.models import build_model, count_parameters
from spade_deploy.mri.physics import MultiCoilMRI
from spade_deploy.solvers import SolverConfig


def _problem(b=2, c=4, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    smaps = torch.randn(b, c, h, w, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = (torch.rand(w, generator=g) < 0.4).float()
    mask[w // 2 - 2 : w // 2 + 2] = 1
    physics = MultiCoilMRI(mask, smaps)
    x = torch.randn(b, h, w, dtype=torch.complex64, generator=g)
    return physics.A(x), physics


def test_paper_preset_has_table1_size():
    model = build_model("deq", preset="paper")
    # EDSR 13 x 64 on 2 channels = 999,426 weights; + residual scale + step size = Table 1's 999,428.
    assert count_parameters(model.prior) - 1 == 999_426
    assert count_parameters(model) == 999_428


def test_unknown_model_and_preset_are_user_errors():
    with pytest.raises(SpadeError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(SpadeError, match="unknown preset"):
        build_model("deq", preset="huge")


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = build_model("deq", preset="tiny").eval()
    with torch.no_grad():
        model.prior.scale.fill_(0.3)
    y, physics = _problem()
    with torch.no_grad():
        ref = model(y, physics)
    path = save_model(tmp_path / "m.safetensors", model, note="test")
    loaded, manifest = load_model(path)
    assert manifest["note"] == "test" and manifest["model"] == "deq"
    with torch.no_grad():
        out = loaded.eval()(y, physics)
    assert torch.equal(out, ref)
    assert torch.equal(model.solve_info().iterations, loaded.solve_info().iterations)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_checkpoint_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.safetensors"
    bad.write_bytes(pickle.dumps({"state": _Exploit(str(marker))}))
    with pytest.raises(SpadeError, match="not a spade-deploy checkpoint"):
        load_model(bad)
    assert not marker.exists()
    torch_file = tmp_path / "torch.pt"
    torch.save({"w": torch.zeros(2), "obj": _Exploit(str(marker))}, torch_file)
    with pytest.raises(SpadeError):
        load_model(torch_file)
    assert not marker.exists()


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    small = save_model(tmp_path / "small.safetensors", build_model("deq", preset="small"))
    with pytest.raises(SpadeError, match="expected 'varnet'"):
        load_model(small, expect="varnet")
    # A manifest that claims one architecture while the tensors are of another.
    from spade_deploy.io import load_checkpoint, save_checkpoint

    state, manifest = load_checkpoint(small)
    manifest["config"]["n_blocks"] = 5
    manifest.pop("format")
    lie = save_checkpoint(tmp_path / "lie.safetensors", state, manifest)
    with pytest.raises(SpadeError, match="does not match the architecture"):
        load_model(lie)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = save_model(tmp_path / "m.safetensors", build_model("deq", preset="tiny"))
    before = path.read_bytes()
    with pytest.raises(TypeError):
        save_model(path, build_model("deq", preset="tiny"), unserialisable=object())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_spectral_hinge_measures_the_jacobian_norm_and_is_differentiable():
    """The convergence penalty's estimate: a linear map with singular values 1.3, 0.6, 0.3, ...
    gives (1.3 - rho)^2."""
    from spade_deploy.mri.deq import spectral_hinge

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    v, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    sing = torch.tensor([1.3, 0.6] + [0.3] * 10)
    m = torch.nn.Parameter(u @ torch.diag(sing) @ v.T)

    def f(x):
        return (x.reshape(1, 12) @ m.T).reshape(x.shape)

    x = torch.randn(1, 3, 2, 2, generator=g)
    value = spectral_hinge(f, x, rho=1.0, iters=12)
    assert value.item() == pytest.approx(0.3**2, rel=1e-3)
    value.backward()
    assert m.grad is not None and m.grad.abs().sum() > 0
    assert spectral_hinge(f, x, rho=1.5, iters=12).item() == 0.0

    # A batch: each sample's own norm (here 1.3 and 0.5), hinges averaged, not one joint norm.
    scale = torch.tensor([1.3, 0.5]).view(2, 1, 1, 1)
    value = spectral_hinge(lambda x: x * scale, torch.randn(2, 3, 2, 2, generator=g), rho=0.4)
    assert value.item() == pytest.approx((0.9**2 + 0.1**2) / 2, rel=1e-4)


def test_spectral_hinge_from_the_fixed_point_residual():
    """Near the fixed point of a contraction ``f(x) = M x + b`` the residual ``f(x) - x`` lies
    along the slowest mode, so one power iteration started there measures ``||M||`` (0.97),
    where a random start is far off."""
    from spade_deploy.mri.deq import spectral_hinge

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
    m = q @ torch.diag(torch.cat([torch.tensor([0.97]), torch.linspace(0.8, 0.05, 63)])) @ q.T
    b = torch.randn(64, generator=g)

    def f(x):
        return (x.reshape(1, 64) @ m.T + b).reshape(x.shape)

    x = torch.zeros(1, 64)
    for _ in range(60):  # plain iteration towards the fixed point: the fast modes die out first
        x = f(x)
    start = spectral_hinge(f, x, rho=0.0, iters=1, from_residual=True).sqrt().item()
    torch.manual_seed(0)
    random = spectral_hinge(f, x, rho=0.0, iters=1).sqrt().item()
    assert start == pytest.approx(0.97, abs=2e-3)
    assert random < 0.95


def test_the_first_power_hinge_meets_the_bound_where_the_squared_one_leaves_it_violated():
    """The operator penalty's exact (first-power) hinge: a loss pulling a map's norm ``a`` to 1.2
    against the bound 1.0 at weight 2 ends on the bound (the weight exceeds the pull's multiplier,
    0.4), where the squared hinge settles at (1.2 + 2) / 3 = 1.067, above it: what left the demo's
    0.4 measured-width supervised DEQ above its parent's contraction on its own training data."""
    from spade_deploy.mri.deq import spectral_hinge

    x = torch.ones(1, 1, 2, 2)
    ends = {}
    for power in (1, 2):
        a = torch.nn.Parameter(torch.tensor(1.2))
        opt = torch.optim.SGD([a], lr=0.01)
        for step in range(3000):
            opt.zero_grad()
            loss = (a - 1.2) ** 2 + 2.0 * spectral_hinge(lambda z: a * z, x, rho=1.0, iters=1, power=power)
            loss.backward()
            opt.step()
        ends[power] = a.item()
    assert ends[1] == pytest.approx(1.0, abs=0.02)  # within the step's oscillation about the kink
    assert ends[2] == pytest.approx(3.2 / 3, abs=1e-3)


@pytest.mark.parametrize("on", ["operator", "prior"])
def test_deq_convergence_penalty_is_zero_under_a_loose_target(on):
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = build_model("deq", preset="tiny")
    y, physics = _problem(b=1, h=48, w=48)
    x = model(y, physics)
    batch = SimpleNamespace(y=y, physics=physics)
    tight = model.regularizer(batch, x, target=0.0, on=on)
    assert tight.item() > 0.5 and tight.requires_grad  # ||J|| of a near-identity prior is about 1
    assert model.regularizer(batch, x, target=10.0, on=on).item() == 0.0
    with pytest.raises(SpadeError, match="operator | prior"):
        from spade_deploy.mri.deq import DEQTrainOptions

        DEQTrainOptions(lipschitz_on="jacobian")


def test_deq_batch_reconstructs_each_slice_as_alone():
    """Samples that stop early drop out of the batch (the solver runs the rest on their own
    operators): a batch gives each slice's own reconstruction and iteration count."""
    torch.manual_seed(0)
    model = build_model("deq", preset="tiny").eval()

    class Shrunk(torch.nn.Module):  # the untrained prior made contractive, so solves converge
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return 0.7 * self.inner(z)

    model.set_prior("prior", Shrunk(model.prior))
    _, physics = _problem(b=3, h=32, w=32)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(3, 1, 1, 32, generator=g) < torch.tensor([0.9, 0.2, 0.5]).view(3, 1, 1, 1)).float()
    physics = MultiCoilMRI(mask, physics.smaps)  # a denser or sparser mask per slice
    y = physics.A(torch.randn(3, 32, 32, dtype=torch.complex64, generator=g))
    # At tol 2e-4 every slice's residual is at least 26 % from the tolerance at its stop and the
    # iteration before (at the default 1e-4 one was 5.9 % under it), so equal counts do not hang on
    # the round-off a batch of one and of three differ by.
    solver = SolverConfig(max_iter=100, tol=2e-4)
    with torch.no_grad():
        x = model(y, physics, solver=solver)
        info = model.solve_info()
        iters, converged = info.iterations.tolist(), bool(info.converged.all())
        for b in range(3):
            alone = model(y[b : b + 1], physics.select([b]), solver=solver)
            assert model.solve_info().iterations.tolist() == [iters[b]]
            torch.testing.assert_close(model.solve_info().residual, info.residual[b : b + 1], rtol=1e-3, atol=0)
            torch.testing.assert_close(alone[0], x[b], rtol=1e-4, atol=1e-5 * float(x[b].abs().max()))
    assert converged and len(set(iters)) > 1  # the slices stopped at different iterations


def test_deq_operator_penalty_covers_every_slice():
    """The penalty of a batch is the mean of its slices' own hinges."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    model = build_model("deq", preset="tiny")
    with torch.no_grad():
        model.prior.scale.fill_(3.0)  # far from the identity: a Jacobian that depends on the slice
    y, physics = _problem(b=3, h=32, w=32)
    x = model(y, physics)

    def penalty(idx):
        batch = SimpleNamespace(y=y[idx], physics=physics.select(idx))
        return model.regularizer(batch, x[idx], target=0.0).item()

    one, two, three = (penalty(slice(i, i + 1)) for i in range(3))
    assert one != pytest.approx(two, rel=1e-3)  # the slices differ
    assert penalty(slice(0, 3)) == pytest.approx((one + two + three) / 3, rel=1e-4)
    # with DEQTrainOptions.lipschitz_samples=1 fine-tuning measures one slice per step: that slice's own hinge
    batch = SimpleNamespace(y=y, physics=physics)
    assert model.regularizer(batch, x, target=0.0, samples=[1]).item() == pytest.approx(two, rel=1e-4)
