"""SPADE pruning: Table 1's parameter counts, group-L1 ranking, safe round trips, bad ratios."""

import pytest
import torch

from spade_deploy.checkpoint import load_model, save_model
from spade_deploy.errors import SpadeError
from spade_deploy.models import build_model, count_parameters
from spade_deploy.mri.physics import MultiCoilMRI
from spade_deploy.prune import prune_checkpoint, prune_model

# Table 1 of the paper: DEQ (EDSR 13 x 64) pruned at per-layer ratios 5 / 10 / 20 / 40 %.
TABLE1 = {0.05: 878_644, 0.1: 793_159, 0.2: 635_311, 0.4: 353_328}


@pytest.fixture(scope="module")
def paper_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("paper") / "deq-paper.safetensors"
    return save_model(path, build_model("deq", preset="paper"))


def test_paper_deq_pruned_has_table1_counts(paper_checkpoint, tmp_path):
    results = prune_checkpoint(paper_checkpoint, list(TABLE1), tmp_path)
    for (path, report), (ratio, expected) in zip(results, TABLE1.items()):
        assert report.params_after == expected, ratio
        model, manifest = load_model(path)  # rebuilt from the shape manifest, no pickles
        assert count_parameters(model) == expected
        assert manifest["pruning"]["ratio"] == ratio and manifest["pruning"]["parent"] == str(paper_checkpoint)
        assert report.macs_after < report.macs_before


def _problem(b=1, c=4, n=32):
    g = torch.Generator().manual_seed(3)
    smaps = torch.randn(b, c, n, n, dtype=torch.complex64, generator=g)
    smaps = smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = torch.zeros(n)
    mask[::3] = 1
    physics = MultiCoilMRI(mask, smaps)
    return physics.A(torch.randn(b, n, n, dtype=torch.complex64, generator=g)), physics


def test_pruned_model_reconstructs_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model("deq", preset="small").eval()
    pruned, report = prune_model(model, 0.4)
    assert pruned.prior.head.out_channels == int(32 * 0.6)
    y, physics = _problem()
    with torch.no_grad():
        out = pruned(y, physics)
    assert out.shape == (1, 32, 32) and torch.isfinite(out).all()
    path = save_model(tmp_path / "p.safetensors", pruned, pruning={"ratio": 0.4})
    again, _ = load_model(path)
    with torch.no_grad():
        assert torch.equal(again.eval()(y, physics), out)
    assert count_parameters(model) == report.params_before  # the input model is left intact


def test_group_l1_ranking_keeps_strong_and_drops_weak_channels():
    torch.manual_seed(0)
    model = build_model("deq", preset="small")
    blk = model.prior.blocks[0]
    with torch.no_grad():
        blk.conv1.weight[5].mul_(100.0)  # the internal channel 5 of block 0: strongest
        blk.conv2.weight[:, 5].mul_(100.0)
        blk.conv1.weight[7].zero_()  # channel 7: no weight at all
        blk.conv2.weight[:, 7].zero_()
        blk.conv1.bias[7] = 0
    pruned, _ = prune_model(model, 0.2)
    # conv1's input channels (the residual trunk) are pruned too, so compare filter norms
    norms = pruned.prior.blocks[0].conv1.weight.abs().flatten(1).sum(1)
    assert norms.max() > 20 * norms.median()  # the strong filter survived
    assert bool((norms > 0).all())  # the empty filter was removed


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5])
def test_bad_ratios_are_user_errors(ratio):
    with pytest.raises(SpadeError, match="between 0 and 1"):
        prune_model(build_model("deq", preset="tiny"), ratio)


def test_output_path_that_is_a_file_is_refused(tmp_path):
    ckpt = save_model(tmp_path / "m.safetensors", build_model("deq", preset="tiny"))
    taken = tmp_path / "taken"
    taken.write_text("x")
    with pytest.raises(SpadeError, match="is a file"):
        prune_checkpoint(ckpt, [0.1], taken)
    assert taken.read_text() == "x"
