"""Iterations that hold on unseen data: the held-out set of real MR images (``spade data --heldout``)
and the fine-tuning contraction control, checked on it."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from spade_deploy.checkpoint import load_model
from spade_deploy.finetune import finetune_model
from spade_deploy.models import bundled_path
from spade_deploy.mri import reader, simulate
from spade_deploy.mri.deq import DEMO, DEQTrainOptions
from spade_deploy.mri.heldout import build_heldout_dataset
from spade_deploy.mri.task import MRITask
from spade_deploy.prune import prune_checkpoint
from spade_deploy.train import TrainConfig, evaluate

SPADE = str(Path(sys.executable).parent / "spade")
SIZE = 64


def test_spade_data_heldout_writes_the_embedded_datas_format_deterministically(tmp_path):
    """`spade data --heldout --root R` writes fastMRI multi-coil files under R/test from the real MR
    images of nibabel and matplotlib (not the embedded template), with the embedded data's matrix,
    coils and header, the same data twice; it refuses to write into a folder that is not its own."""
    out = subprocess.run([SPADE, "data", "--heldout", "--root", str(tmp_path / "a")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "a" / "test").glob("*.h5"))
    assert [f.name for f in files] == ["heldout_epi_t0.h5", "heldout_epi_t1.h5", "heldout_sagittal.h5"]
    embedded = simulate.SimConfig()
    slices = 0
    for f in files:
        with h5py.File(f, "r") as h:
            assert h["kspace"].shape[1:] == (embedded.n_coils, embedded.size, embedded.size)
            assert h["kspace"].dtype == np.complex64 and np.isfinite(h["kspace"][()]).all()
            rss = h["reconstruction_rss"][()]
            assert rss.max() > 0.1 and (rss > 0.1 * rss.max()).mean() > 0.1  # an object, not noise
            slices += h["kspace"].shape[0]
    assert slices == 16
    ds = reader.SliceDataset(tmp_path / "a" / "test")  # what spade bench / eval --data read
    assert len(ds) == 16
    build_heldout_dataset(tmp_path / "b")
    # The same data again, to 1e-3 of each array's maximum: not bit for bit (two runs under
    # OPENBLAS_CORETYPE=Haswell ONEDNN_MAX_CPU_ISA=AVX2 differed by up to 2.2e-4 of the rss maximum).
    for f in files:
        with h5py.File(f, "r") as one, h5py.File(tmp_path / "b" / "test" / f.name, "r") as two:
            assert sorted(one) == sorted(two) and sorted(one.attrs) == sorted(two.attrs)
            assert one["ismrmrd_header"][()] == two["ismrmrd_header"][()]
            for key in ("kspace", "reconstruction_rss", "sens_maps"):
                a, b = one[key][()], two[key][()]
                assert a.shape == b.shape and np.abs(a - b).max() <= 1e-3 * np.abs(a).max(), key
            for key in one.attrs:
                assert np.allclose(one.attrs[key], two.attrs[key], rtol=1e-3, atol=0) if not isinstance(
                    one.attrs[key], str) else one.attrs[key] == two.attrs[key], key
    data = tmp_path / "data"
    data.mkdir()
    (data / "mine.h5").write_bytes(b"user data")
    bad = subprocess.run([SPADE, "data", "--heldout", "--root", str(data)], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
    assert (data / "mine.h5").read_bytes() == b"user data" and sorted(p.name for p in data.iterdir()) == ["mine.h5"]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The shipped small DEQ (the parent) pruned at 0.4, fine-tuned briefly (supervised, the demo's
    rate) on a few simulated training slices with the demo's contraction control (the defaults of
    ``spade finetune``: exact hinge, weight 1, every slice) and with it switched off
    (``lipschitz_weight=0``); and a small held-out set."""
    base = tmp_path_factory.mktemp("heldout")
    root = base / "data"
    cfg = simulate.SimConfig(train_volumes=1, train_slices=4, val_volumes=1, val_slices=1, test_volumes=1,
                             test_slices=1, size=SIZE)
    simulate.build_default_dataset(root, seed=3, config=cfg)
    heldout = base / "heldout"
    build_heldout_dataset(heldout, slices=2, config=dataclasses.replace(simulate.SimConfig(), size=SIZE))
    parent = base / "deq-small.safetensors"
    shutil.copyfile(bundled_path("deq", "small"), parent)
    (student, _), = prune_checkpoint(parent, [0.4], base / "pruned")
    demo = DEMO.finetune["supervised"]
    assert demo.model_options == DEQTrainOptions()  # what `spade finetune` runs without options
    runs = {}
    for name, weight in (("on", demo.model_options.lipschitz_weight), ("off", 0.0)):
        torch.manual_seed(0)
        cfg = dataclasses.replace(demo, epochs=2, batch_size=2, validate=False, model_options=dataclasses.replace(
            demo.model_options, lipschitz_weight=weight, train_max_iter=30))
        runs[name] = finetune_model(student, "supervised", root, base / name, cfg, checkpoint_seconds=None).best_path
    return parent, runs, heldout


def heldout_check(parent, variant, heldout) -> tuple[bool, float, float]:
    """The held-out iteration check of benchmarks/heldout.py: mean iterations <= the parent's and
    every slice converged."""
    ds = reader.SliceDataset(heldout / "test")
    p = evaluate(load_model(parent)[0], ds, MRITask(6))
    v = evaluate(load_model(variant)[0], ds, MRITask(6))
    assert p.all_converged
    return bool(v.all_converged and v.mean_iterations <= p.mean_iterations), v.mean_iterations, p.mean_iterations


def test_the_contraction_control_keeps_heldout_iterations_at_or_below_the_parents(tuned):
    """Fine-tuned with the demo's contraction control, the pruned DEQ needs no more fixed-point
    iterations than its parent on real MR images it never saw, every slice converged."""
    parent, runs, heldout = tuned
    held, mine, theirs = heldout_check(parent, runs["on"], heldout)
    assert held, (mine, theirs)


def test_the_heldout_check_fails_with_the_contraction_control_switched_off(tuned):
    """The same fine-tuning with the control off (``lipschitz_weight=0``) fails that check: the check
    can fail, and it is the control that makes it pass."""
    parent, runs, heldout = tuned
    held, mine, theirs = heldout_check(parent, runs["off"], heldout)
    assert not held, (mine, theirs)
