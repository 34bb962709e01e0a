"""Deploy-time widths (spade_deploy/deploy/widths.py): a pruned prior padded with zero filters
computes exactly what it computed before, and is deployed padded only where the device (here an
injected timer, never the wall clock) runs the wider widths faster, the whole priors included."""

import pytest
import torch

from spade_deploy.deploy.widths import deploy_widths, pad_prior, parent_widths
from spade_deploy.models import build_model, layer_shapes
from spade_deploy.prune import prune_model
from spade_deploy.tasks import task_for
from test_hwaware import MacTimer, WholeIsFastest

TOL = 1e-5  # relative: padded and unpadded priors differ only by float summation order


def _pruned(name: str, preset: str = "tiny", ratio: float = 0.4):
    torch.manual_seed(0)
    model = build_model(name, preset=preset).eval()
    with torch.no_grad():  # non-zero biases and norms, so a padded channel that leaked would show
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pruned, _ = prune_model(model, ratio)
    return model, pruned


def _roots(prior, example, ignored):
    from spade_deploy.hwaware import prunable_groups

    names = {m: n for n, m in prior.named_modules()}
    return {names[root]: c for root, _, _, c in prunable_groups(prior, example, ignored)}


def _rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("name", ["deq", "varnet", "e2e-varnet", "usrnet"])
def test_padding_to_the_parent_widths_is_the_same_function(name):
    """Every group padded back to the parent's width: the parent's layer shapes, the pruned
    prior's outputs (residual trunks, U-Net skip concatenations, instance norms, transposed
    convolutions)."""
    parent, pruned = _pruned(name)
    for pname, prior in pruned.priors().items():
        ex = pruned.prior_example_input(pname, 32, 32)
        groups = _roots(prior, ex, pruned.prior_output_layers(pname))
        want = {layer: parent_widths(pruned)[pname][layer][1] for layer in groups}
        assert any(want[layer] > c for layer, c in groups.items())  # something to pad
        padded = pad_prior(prior, ex, want, pruned.prior_output_layers(pname))
        assert layer_shapes(padded) == layer_shapes(parent.priors()[pname])
        x = torch.randn_like(ex)
        with torch.no_grad():
            assert _rel(prior(x), padded(x)) <= TOL
        assert layer_shapes(prior) != layer_shapes(padded)  # the pruned prior itself is untouched


def test_padding_some_groups_part_of_the_way_is_exact():
    """Groups padded to different widths, some not at all: the zeros land where each group's
    channels sit in the U-Net's concatenations."""
    _, pruned = _pruned("varnet", preset="small")
    prior = pruned.priors()["cascade0"]
    ex = pruned.prior_example_input("cascade0", 32, 32)
    groups = _roots(prior, ex, pruned.prior_output_layers("cascade0"))
    parent = parent_widths(pruned)["cascade0"]
    want = {layer: c + (i % 3) * (parent[layer][1] - c) // 2 for i, (layer, c) in enumerate(groups.items())}
    padded = pad_prior(prior, ex, want, pruned.prior_output_layers("cascade0"))
    assert {layer: layer_shapes(padded)[layer][1] for layer in groups} == want
    x = torch.randn(2, *ex.shape[1:])
    with torch.no_grad():
        assert _rel(prior(x), padded(x)) <= TOL


def test_deployed_variant_pads_to_the_parent_where_pruned_widths_run_slower():
    """A device where every width below the parent's 32 runs slower than 32 (issue 27's CPU): the
    paper's 19 of 32 filters are deployed as 32, the same reconstruction, and the ratio buys
    nothing when pruned to measured widths there."""
    parent, pruned = _pruned("deq", preset="small")
    deployed = deploy_widths(pruned, "cpu", shape=(24, 24), timer=WholeIsFastest())
    assert layer_shapes(deployed.prior) == layer_shapes(parent.prior)
    choice = deployed.width_choice
    assert choice.padded and choice.label() == "19->32" and choice.prior_ms[choice.kept] < choice.prior_ms["pruned"]
    assert set(deployed.deployed_widths["prior"].values()) == {32}
    y, physics = task_for(pruned).synthetic_sample(24, 24)
    with torch.no_grad():
        assert _rel(pruned(y, physics), deployed(y, physics)) <= 1e-4
    assert deployed.solve_info().iterations.tolist() == pruned.solve_info().iterations.tolist()
    assert layer_shapes(pruned.prior)["head"] == [2, 19]  # the caller's model is not changed
    # the same device when pruning to measured widths: every group kept whole, the ratio buys nothing
    _, report = prune_model(parent, 0.4, "auto", timer=WholeIsFastest(), measure_size=(24, 24))
    assert report.buys_nothing and report.verdict().startswith("ratio 0.4 buys nothing")


def test_no_padding_where_the_pruned_widths_are_faster():
    """Time proportional to MACs: no wider width is faster, the model deploys as pruned."""
    _, pruned = _pruned("deq", preset="small")
    deployed = deploy_widths(pruned, "cpu", shape=(24, 24), timer=MacTimer())
    assert layer_shapes(deployed.prior) == layer_shapes(pruned.prior)
    assert not deployed.width_choice.padded and deployed.width_choice.label() == ""
    assert set(deployed.deployed_widths["prior"].values()) == {19}
    assert not hasattr(pruned, "width_choice")  # recorded on the deployed copy only


class PaddedSlowerAsAWhole(WholeIsFastest):
    """Convolutions one by one say 32 pays; the whole priors, timed together, say it does not."""

    def prior_seconds(self, models, size):
        return {label: 1.0 if label == "pruned" else 2.0 for label in models}


def test_padding_is_kept_only_where_the_whole_priors_run_faster():
    _, pruned = _pruned("deq", preset="small")
    deployed = deploy_widths(pruned, "cpu", shape=(24, 24), timer=PaddedSlowerAsAWhole())
    assert layer_shapes(deployed.prior) == layer_shapes(pruned.prior)
    choice = deployed.width_choice
    assert not choice.padded and "deployed as pruned" in choice.note
    assert choice.prior_ms["pruned"] == 1000.0 and choice.prior_ms["parent"] == 2000.0
    assert set(choice.candidates) >= {"parent"}  # the parent's widths were tried as a whole


def test_unpruned_models_deploy_unchanged():
    parent, _ = _pruned("deq")
    assert deploy_widths(parent, "cpu", shape=(24, 24), timer=WholeIsFastest()) is parent


def test_auto_backend_deploys_the_padded_widths(monkeypatch):
    """``deploy(model, "auto")`` runs the width choice (its timer injected here) before choosing the
    engine: the deployed model runs the parent's widths and says so."""
    import spade_deploy.deploy.widths as widths
    from spade_deploy.deploy.runtime import deploy

    timer = WholeIsFastest()
    monkeypatch.setattr(widths, "default_timer", lambda device: timer)
    monkeypatch.setenv("SPADE_AUTO_ENGINES", "torch")
    parent, pruned = _pruned("deq", preset="small")
    deployed = deploy(pruned, "auto", None, "cpu", shape=(24, 24))
    assert deployed.width_choice.padded and set(deployed.deployed_widths["prior"].values()) == {32}
    # the convolutions inside the engine's module run the parent's widths
    assert {w for shape in layer_shapes(deployed.priors()["prior"]).values() for w in shape} == {2, 32}
    y, physics = task_for(pruned).synthetic_sample(24, 24)
    with torch.no_grad():
        assert _rel(pruned(y, physics), deployed(y, physics)) <= 1e-4
