"""The base models shipped in the package: safe to load, used only for the data they were trained on."""

import numpy as np
import torch

from spade_deploy.mri import reader, simulate
from spade_deploy.checkpoint import load_model
from spade_deploy.mri.metrics import psnr
from spade_deploy.sr.data import EMBEDDED
from spade_deploy.mri.acquisition import eval_seeds, make_batch
from spade_deploy.mri.task import MRITask
from spade_deploy.sr.task import SRTask
from spade_deploy.models import bundled_base, bundled_path


def test_shipped_deq_is_used_only_for_its_dataset_and_reconstructs_it(tmp_path, tiny_dataset):
    task = MRITask()
    assert bundled_base("deq", "small", task.dataset_key(tiny_dataset.root)) is None  # another simulation config
    assert bundled_base("deq", "small", task.dataset_key(tmp_path)) is None  # not an embedded dataset at all
    root = tmp_path / "default"
    simulate.build_default_dataset(root, seed=0)
    assert bundled_base("deq", "paper", task.dataset_key(root)) is None
    path = bundled_base("deq", "small", task.dataset_key(root))
    assert path == bundled_path("deq", "small")
    model, manifest = load_model(path)
    assert manifest["model"] == "deq" and manifest["preset"] == "small"
    items = reader.collate([reader.SliceDataset(root / "test")[0]])
    batch = make_batch(items, 6, 0.08, eval_seeds(items))
    with torch.no_grad():
        x = model.eval()(batch.y, batch.physics)
    assert bool(model.solve_info().converged.all())
    ref = batch.x_gt.abs().numpy()
    zero_filled = batch.physics.A_adjoint(batch.y).abs().numpy()
    assert psnr(ref, x.abs().numpy()) > psnr(ref, zero_filled) + 4.0


def test_shipped_usrnet_is_used_only_for_the_embedded_photographs_and_beats_bicubic(tmp_path):
    """The SR key covers the photographs' bytes and the degradation: another tile size, scale set
    or kernel is other data; a user's folder never gets the shipped model."""
    key = SRTask().dataset_key(None)
    assert key == SRTask().dataset_key(None) and set(key["images"]) == set(EMBEDDED)
    assert bundled_base("usrnet", "small", key) == bundled_path("usrnet", "small")
    assert bundled_base("usrnet", "paper", key) is None
    for other in (SRTask(patch=96), SRTask(scales=(2,)), SRTask(kernels={"k1": np.ones((3, 3)) / 9})):
        assert bundled_base("usrnet", "small", other.dataset_key(None)) is None
    assert SRTask(data=tmp_path).dataset_key(None) is None
    assert SRTask().dataset_key(tmp_path) is None
    model, manifest = load_model(bundled_path("usrnet", "small"))
    assert manifest["preset"] == "small" and manifest["dataset"] == key
    # On the test photographs it beats bicubic upsampling at x2, x3 and x4 with every kernel, the
    # narrowest Gaussian (k1) included, and by over 3 dB on average.
    task = SRTask()
    scores = task.evaluate(model.eval(), task.dataset(None, "test"))
    assert len(scores.rows) == 36 and scores.psnr > scores.psnr_baseline + 3.0
    assert all(r.psnr > r.psnr_bicubic for r in scores.rows), [(r.kernel, r.psnr, r.psnr_bicubic) for r in scores.rows]
