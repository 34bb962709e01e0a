"""The base model shipped in the package: safe to load, used only for the dataset it was trained on."""

import torch

from spade_deploy import data as D
from spade_deploy.checkpoint import load_model
from spade_deploy.metrics import psnr
from spade_deploy.tasks.mri import eval_seeds, make_batch
from spade_deploy.zoo import bundled_base, bundled_path


def test_shipped_deq_is_used_only_for_its_dataset_and_reconstructs_it(tmp_path, tiny_dataset):
    assert bundled_base("deq", "small", tiny_dataset.root) is None  # another simulation config
    assert bundled_base("deq", "small", tmp_path) is None  # not an embedded dataset at all
    assert bundled_base("deq", "paper", tmp_path) is None
    root = tmp_path / "default"
    D.build_default_dataset(root, seed=0)
    path = bundled_base("deq", "small", root)
    assert path == bundled_path("deq", "small")
    model, manifest = load_model(path)
    assert manifest["model"] == "deq" and manifest["preset"] == "small"
    items = D.collate([D.SliceDataset(root / "test")[0]])
    batch = make_batch(items, 6, 0.08, eval_seeds(items))
    with torch.no_grad():
        x = model.eval()(batch.y, batch.physics)
    assert bool(model.last_info.converged.all())
    ref = batch.x_gt.abs().numpy()
    zero_filled = batch.physics.A_adjoint(batch.y).abs().numpy()
    assert psnr(ref, x.abs().numpy()) > psnr(ref, zero_filled) + 4.0
