"""VarNet / E2E-VarNet: fastMRI's numbers and keys, Table 1's counts, pruning, export, checkpoints."""

import json

import pytest
import torch
from fastmri.models import VarNet as FastMRIVarNet
from torch import nn

from spade_deploy.checkpoint import is_pruned, load_model, save_model
from spade_deploy.errors import SpadeError
from spade_deploy.deploy.export import export_onnx
from spade_deploy.models import build_model, count_parameters
from spade_deploy.mri.varnet import load_fastmri_checkpoint
from spade_deploy.mri.physics import MultiCoilMRI, equispaced_mask
from spade_deploy.prune import PAPER_RATIOS, prune_checkpoint, prune_model
from spade_deploy.deploy.runtime import deploy

TINY = dict(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2)
# Table 1 of the paper.
TABLE1 = {
    "varnet": (19_634_712, [17_567_216, 15_772_920, 12_477_088, 6_988_752]),
    "e2e-varnet": (20_119_610, [18_052_114, 16_257_818, 12_961_986, 7_473_650]),
}


def _problem(b=2, c=4, h=40, w=36, acceleration=4):
    """Undersampled random k-space at an awkward size (padding and odd centre bands exercised)."""
    g = torch.Generator().manual_seed(1)
    k = torch.randn(b, c, h, w, dtype=torch.complex64, generator=g)
    mask = torch.stack([torch.from_numpy(equispaced_mask(w, 0.08, acceleration, seed=i)) for i in range(b)])
    mask = mask.view(b, 1, 1, w)
    smaps = torch.randn(b, c, h, w, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    return k * mask, MultiCoilMRI(mask, smaps)


def _fastmri_reference(model: FastMRIVarNet, y, physics, given_maps: bool):
    if given_maps:  # fastMRI's VarNet with the estimator replaced by the given maps
        maps = torch.view_as_real(physics.smaps)

        class Given(nn.Module):
            def forward(self, *_):
                return maps

        model.sens_net = Given()
    with torch.no_grad():
        return model(torch.view_as_real(y), physics.mask.bool().unsqueeze(-1))


@pytest.mark.parametrize("name", ["e2e-varnet", "varnet"])
def test_same_output_as_fastmri(name):
    torch.manual_seed(0)
    ref_model = FastMRIVarNet(**TINY).eval()
    ours = build_model(name, config=TINY).eval()
    state = ref_model.state_dict()
    if name == "varnet":
        state = {k: v for k, v in state.items() if not k.startswith("sens_net.")}
    ours.load_state_dict(state)  # same keys, strictly
    y, physics = _problem()
    ref = _fastmri_reference(ref_model, y, physics, given_maps=name == "varnet")
    with torch.no_grad():
        out = ours(y, physics)
    assert out.shape == ref.shape and torch.is_complex(out)
    assert ((out.abs() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("name", list(TABLE1))
def test_paper_preset_counts_and_fastmri_keys(name):
    model = build_model(name, preset="paper")
    assert count_parameters(model) == TABLE1[name][0]
    keys = set(FastMRIVarNet(num_cascades=8, chans=18, pools=4, sens_chans=8, sens_pools=4).state_dict())
    if name == "varnet":
        keys = {k for k in keys if not k.startswith("sens_net.")}
    assert set(model.state_dict()) == keys
    assert list(model.priors()) == [f"cascade{i}" for i in range(8)]


@pytest.mark.parametrize("name", list(TABLE1))
def test_paper_preset_pruned_has_table1_counts(name):
    """Each cascade's U-Net pruned on its own; the sensitivity network is left whole."""
    model = build_model(name, preset="paper")
    for ratio, expected in zip(PAPER_RATIOS, TABLE1[name][1]):
        pruned, report = prune_model(model, ratio, example_size=(32, 32))
        assert abs(count_parameters(pruned) - expected) <= 0.01 * expected, ratio
        assert [p.name for p in report.priors] == [f"cascade{i}" for i in range(8)]
    if name == "e2e-varnet":
        assert count_parameters(pruned.sens_net) == count_parameters(model.sens_net)


def test_pruned_checkpoint_round_trip_runs_and_exports(tmp_path):
    torch.manual_seed(0)
    src = save_model(tmp_path / "e2e.safetensors", build_model("e2e-varnet", config=TINY))
    y, physics = _problem()
    for (path, report), ratio in zip(prune_checkpoint(src, list(PAPER_RATIOS), tmp_path / "pruned"), PAPER_RATIOS):
        model, manifest = load_model(path)
        assert is_pruned(manifest) and count_parameters(model) == report.params_after < report.params_before
        with torch.no_grad():
            x = model.eval()(y, physics)
        assert x.shape == y.shape[:1] + y.shape[2:] and torch.isfinite(x.abs()).all()
        res = export_onnx(model, tmp_path / "onnx", f"r{ratio}")
        entries = json.loads(res.manifest_path.read_text())["priors"]
        assert [e["name"] for e in entries] == ["cascade0", "cascade1"]
        assert all(e["max_rel_error"] <= 1e-4 for e in entries), entries
    deployed = deploy(model, "onnxruntime", res.manifest_path)
    with torch.no_grad():
        assert torch.allclose(deployed(y, physics).abs(), x.abs(), rtol=1e-4, atol=1e-4 * x.abs().max())


def test_fastmri_checkpoints_load_unchanged(tmp_path):
    torch.manual_seed(0)
    src = FastMRIVarNet(**TINY).eval()
    plain, lightning = tmp_path / "varnet.pt", tmp_path / "varnet.ckpt"
    torch.save(src.state_dict(), plain)
    torch.save({"state_dict": {f"varnet.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, lightning)
    y, physics = _problem()
    ref = _fastmri_reference(src, y, physics, given_maps=False)
    for path in (plain, lightning):
        model, info = load_fastmri_checkpoint(path, "e2e-varnet")
        assert model.cfg.num_cascades == 2 and model.cfg.chans == 4 and model.cfg.sens_pools == 2
        with torch.no_grad():
            assert ((model.eval()(y, physics).abs() - ref).abs().max() / ref.max()) < 1e-5
    model, info = load_fastmri_checkpoint(plain, "varnet")  # given ESPIRiT maps replace the estimator
    assert not hasattr(model, "sens_net") and info["dropped_keys"] > 0


def test_bad_fastmri_checkpoints(tmp_path):
    torch.save(FastMRIVarNet(**TINY).state_dict(), tmp_path / "two.pt")
    with pytest.raises(SpadeError, match="2 cascades"):
        load_fastmri_checkpoint(tmp_path / "two.pt", expect=build_model("varnet", preset="paper").cfg)
    torch.save(nn.Conv2d(2, 2, 3).state_dict(), tmp_path / "conv.pt")
    with pytest.raises(SpadeError, match="not a fastMRI VarNet"):
        load_fastmri_checkpoint(tmp_path / "conv.pt")
    torch.save(nn.Conv2d(2, 2, 3), tmp_path / "module.pt")  # a pickled module is never executed
    with pytest.raises(SpadeError, match="not a loadable"):
        load_fastmri_checkpoint(tmp_path / "module.pt")


def test_checkpoint_of_another_cascade_count_is_refused(tmp_path):
    path = save_model(tmp_path / "v.safetensors", build_model("varnet", config=TINY))
    from spade_deploy.io import load_checkpoint
    from spade_deploy.models import load_state

    state, _ = load_checkpoint(path)
    with pytest.raises(SpadeError, match="does not match"):
        load_state(build_model("varnet", config={**TINY, "num_cascades": 3}), state)


def test_e2e_measurement_operator_uses_estimated_maps():
    torch.manual_seed(0)
    model = build_model("e2e-varnet", config=TINY).eval()
    y, physics = _problem()
    op = model.measurement_operator(y, physics)
    assert op.smaps.shape == y.shape and not torch.equal(op.smaps, physics.smaps)
    assert torch.allclose(op.smaps.abs().pow(2).sum(1), torch.ones(()), atol=1e-4)
    assert build_model("varnet", config=TINY).measurement_operator(y, physics) is physics


def test_mismatching_coil_maps_are_a_clear_error():
    model = build_model("varnet", config=TINY)
    y, physics = _problem()
    with pytest.raises(SpadeError, match="does not match coil maps"):
        model(y[:, :3], physics)


def test_import_command_converts_a_fastmri_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    torch.manual_seed(0)
    src = FastMRIVarNet(**TINY).eval()
    torch.save(src.state_dict(), tmp_path / "varnet.pt")
    out = tmp_path / "imported.safetensors"
    runner = CliRunner()
    result = runner.invoke(app, ["import", str(tmp_path / "varnet.pt"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    model, manifest = load_model(out)
    assert manifest["model"] == "e2e-varnet" and manifest["imported"]["format"] == "fastmri"
    y, physics = _problem()
    ref = _fastmri_reference(src, y, physics, given_maps=False)
    with torch.no_grad():
        assert ((model.eval()(y, physics).abs() - ref).abs().max() / ref.max()) < 1e-5
    # a checkpoint of another size than the preset asked for: one line, exit 1, nothing written
    refused = tmp_path / "refused.safetensors"
    result = runner.invoke(app, ["import", str(tmp_path / "varnet.pt"), "-o", str(refused), "--preset", "paper"])
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "2 cascades" in result.stderr
    assert not refused.exists()


def test_pruned_checkpoint_loads_with_matching_norm_widths(tmp_path, recwarn):
    """InstanceNorm holds its width only in num_features: a loaded pruned model keeps it equal to
    its convolution's, as the freshly pruned one has (no size-mismatch warning on every forward)."""
    src = save_model(tmp_path / "v.safetensors", build_model("varnet", config=TINY))
    (path, _), = prune_checkpoint(src, [0.4], tmp_path / "pruned")
    model, _ = load_model(path)
    for block in model.modules():
        if isinstance(block, nn.Sequential):
            convs_and_norms = [m for m in block if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d))]
            for conv, norm in zip(convs_and_norms, convs_and_norms[1:]):
                if isinstance(norm, nn.InstanceNorm2d):
                    assert norm.num_features == conv.out_channels
    recwarn.clear()
    y, physics = _problem()
    with torch.no_grad():
        model.eval()(y, physics)
    assert not [w for w in recwarn if "num_features" in str(w.message)]


def test_school_loss_distils_varnet_magnitudes_only():
    """fastMRI's VarNet outputs a magnitude; its phase is no target for the student (eq. 8)."""
    from types import SimpleNamespace

    from spade_deploy.losses import SchoolLoss

    torch.manual_seed(0)
    teacher = build_model("varnet", config=TINY).eval()
    y, physics = _problem()
    batch = SimpleNamespace(y=y, physics=physics, keys=[("a", 0), ("b", 0)])
    with torch.no_grad():
        x = teacher(y, physics)
    rotated = x * torch.exp(1j * torch.rand(x.shape))
    loss = SchoolLoss()
    assert loss(rotated, batch, teacher, teacher).item() < 1e-10
    assert loss(0.9 * rotated, batch, teacher, teacher).item() > 1e-3


def _batch(y, physics):
    from spade_deploy.tasks import Batch

    b = y.shape[0]
    return Batch(y, physics, None, None, keys=[("f", 0)] * b, meta={"maxval": torch.ones(b)})


@pytest.mark.parametrize("name", ["e2e-varnet", "varnet"])
def test_self_supervised_fidelity_is_the_masked_predicted_kspace(name, monkeypatch):
    """Eq. (9)'s ``A f(y)`` for a VarNet is its own k-space prediction under the mask, read from the
    forward pass that produced ``x`` (the cascades do not run a second time)."""
    from spade_deploy.losses import SelfSupervisedLoss, relative_sq_error

    torch.manual_seed(0)
    model = build_model(name, config=TINY)
    y, physics = _problem()
    with torch.no_grad():
        k_pred, _ = model.predict_kspace(y, physics)
    expected = relative_sq_error(physics.mask * k_pred, y)
    x = model(y, physics)

    def no_second_pass(*_):
        raise AssertionError("the cascades ran again")

    monkeypatch.setattr(model, "predict_kspace", no_second_pass)
    fidelity = SelfSupervisedLoss().fidelity(x, _batch(y, physics), model)
    assert torch.allclose(fidelity, expected, rtol=1e-5)
    fidelity.backward()  # the gradient reaches the cascades through the k-space
    assert model.cascades[0].model.unet.output_conv.weight.grad.abs().sum() > 0
    if name == "e2e-varnet":  # not the image re-measured through the estimated maps
        with torch.no_grad():
            old = relative_sq_error(model.measurement_operator(y, physics).A(x), y)
        assert not torch.allclose(old, expected, rtol=1e-2)
    monkeypatch.undo()
    # an image not produced by the last forward pass: its k-space is recomputed, not mixed up
    other = x.detach().clone()
    assert torch.allclose(model.predicted_measurements(other, y, physics), physics.mask * k_pred, atol=1e-6)


def test_model_holding_the_last_kspace_still_copies():
    import copy

    model = build_model("e2e-varnet", config=TINY)
    y, physics = _problem()
    model(y, physics)  # holds tensors with a graph
    clone = copy.deepcopy(model)
    assert clone._last.k is None and model._last.k is not None
