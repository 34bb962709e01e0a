"""The task seam: MRI results are those of the code before the seam (a recorded reference), and
the trainer / losses / evaluate / bench name no task."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"


def test_mri_results_unchanged_by_the_task_seam(tmp_path):
    """evaluate()'s per-volume PSNR / SSIM / NMSE and iterations, and the histories and weight
    updates of a two-step fit() per strategy (deq, varnet, e2e-varnet), equal those recorded
    (tests/golden/record_mri.py) within the tolerances recorded beside them: they hold across CPUs,
    BLAS kernels and thread counts, and another sampling mask or loss fails them."""
    from safetensors.torch import load_file

    sys.path.insert(0, str(GOLDEN))
    from record_mri import compare, run

    got, updates = run(tmp_path, threads=1)  # as recorded
    want = json.loads((GOLDEN / "mri.json").read_text())
    worst = compare(got, updates, want, load_file(GOLDEN / "mri-updates.safetensors"))
    failed = {kind: where for kind, (fraction, where) in worst.items() if fraction > 1}
    assert not failed, failed


GENERIC = ["train.py", "losses.py", "bench.py", "finetune.py", "pipeline.py", "demo.py"]
MRI_WORDS = r"(acceleration|center_fraction|kspace|k-space|SliceDataset|make_batch|eval_seeds|smaps|coil|fastmri|" \
            r"reconstruction_rss|zero.filled|MultiCoilMRI|recon_size|fnames)"


@pytest.mark.parametrize("module", GENERIC)
def test_task_agnostic_modules_name_no_mri_concept_in_code(module):
    """Outside comments and docstrings, the trainer, the losses, fine-tuning and the bench use no
    MRI-specific name (a new task is new files under spade_deploy/tasks/)."""
    import ast

    import spade_deploy

    src = (Path(spade_deploy.__file__).parent / module).read_text()
    tree = ast.parse(src)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {a.name for a in node.names} | {getattr(node, "module", "") or ""}
    bad = sorted(n for n in names if re.search(MRI_WORDS, n, re.I))
    assert not bad, f"{module} uses {bad}"


@pytest.mark.parametrize("module", GENERIC)
def test_task_agnostic_modules_mention_no_mri_option_at_all(module):
    """Not even in comments: the MRI task's options and scores (sampling, coil maps, SENSE) are
    named only under spade_deploy/tasks/ and the data and physics modules."""
    import spade_deploy

    lines = (Path(spade_deploy.__file__).parent / module).read_text().splitlines()
    bad = [f"{i}: {line.strip()}" for i, line in enumerate(lines, 1)
           if re.search(r"sense|acceleration|center_fraction|kspace|coil", line, re.I)]
    assert not bad, f"{module}: {bad}"


def test_physics_share_one_interface():
    from spade_deploy.mri.physics import MultiCoilMRI
    from spade_deploy.physics import Physics
    from spade_deploy.sr.physics import SRPhysics

    assert issubclass(MultiCoilMRI, Physics) and issubclass(SRPhysics, Physics)
    sr = SRPhysics(torch.full((3, 3), 1 / 9), 2)
    x = torch.rand(2, 3, 8, 8)
    y = torch.rand(2, 3, 4, 4)
    # adjoint: <A x, y> = <x, A^T y>
    assert torch.allclose((sr.A(x) * y).sum(), (x * sr.A_adjoint(y)).sum(), atol=1e-5)
    assert torch.allclose(sr.grad(x, y), sr.A_adjoint(sr.A(x) - y))
    assert sr.select([0]).kernel.shape == sr.kernel.shape and sr.rotate([1, 1]).scale == 2


def test_models_declare_their_task():
    from spade_deploy.models import build_model
    from spade_deploy.tasks import task_for
    from spade_deploy.mri.task import MRITask
    from spade_deploy.sr.task import SRTask

    assert isinstance(task_for(build_model("deq", preset="tiny")), MRITask)
    assert isinstance(task_for(build_model("usrnet", preset="tiny")), SRTask)


def test_sr_equivariant_transform_turns_the_kernel_with_the_scene():
    """Self-supervised SR: ``A_phi`` blurs the transformed scene as the scene's blur transformed
    (the kernel turned with the rotation; the shift commutes with the circular blur)."""
    from spade_deploy.physics import random_quarter_turns, rotate_images
    from spade_deploy.sr.physics import SRPhysics

    g = torch.Generator().manual_seed(0)
    k = torch.rand(5, 5, generator=g, dtype=torch.float64)
    physics = SRPhysics(k / k.sum(), 2)  # an asymmetric kernel: a wrong turn would show
    x = torch.rand(4, 3, 16, 16, generator=g)
    torch.manual_seed(3)
    x_phi, physics_phi = physics.transform(x)
    torch.manual_seed(3)
    ks = random_quarter_turns(x)
    shifts = torch.randint(0, 2, (2,)).tolist()
    assert len(set(ks)) > 1  # the batch mixes rotations
    expect = torch.roll(rotate_images(physics.blur(x), ks), shifts, dims=(-2, -1))
    assert torch.allclose(physics_phi.blur(x_phi), expect, atol=1e-5)
    assert physics_phi.A(x_phi).shape == (4, 3, 8, 8)


def test_sr_task_scores_are_the_official_test_loop():
    """SRTask.evaluate gives, per scale and kernel, the numbers of the official loop written out
    here (degrade each image, restore, PSNR / SSIM with the scale² border, mean over the images),
    for the model and for its bicubic baseline."""
    from spade_deploy.sr.baseline import bicubic_upsample
    from spade_deploy.sr.degradation import degrade
    from spade_deploy.sr.kernels import kernel_names, paper_kernels
    from spade_deploy.sr.metrics import mean_scores, sr_scores
    from spade_deploy.sr.task import SRTask

    class Bicubic(torch.nn.Module):
        def forward(self, y, physics):
            return bicubic_upsample(y, physics.scale)

    kernels = dict(list(zip(kernel_names(), paper_kernels()))[7:9])  # k8 (Gaussian), k9 (motion)
    task = SRTask(scales=(2, 3), kernels=kernels, crop=48)
    res = task.evaluate(Bicubic(), task.dataset(None, "test"), batch_size=2)
    want = []
    for scale in (2, 3):
        for name, k in kernels.items():
            scores = []
            for im in task.images("test"):
                hr, lr = degrade(im.image, k, scale)
                scores.append(sr_scores(hr, bicubic_upsample(torch.from_numpy(lr).permute(2, 0, 1)[None], scale), scale))
            want.append((scale, name, mean_scores(scores)))
    assert [(r.scale, r.kernel) for r in res.rows] == [(s, k) for s, k, _ in want]
    for got, (_, _, ref) in zip(res.rows, want):
        assert got.psnr == pytest.approx(ref["psnr"], abs=1e-9) and got.ssim == pytest.approx(ref["ssim"], abs=1e-9)
        assert got.psnr_bicubic == pytest.approx(ref["psnr"], abs=1e-9)
    assert res.psnr_baseline == pytest.approx(res.psnr, abs=1e-9)


def test_sr_training_batches_follow_the_global_random_state():
    """Training tiles are degraded afresh from the global random states (what the trainer seeds and
    checkpoints): the same seed gives the same batch, another seed another degradation."""
    import numpy as np

    from spade_deploy.sr.task import SRTask

    task = SRTask()
    ds = task.dataset(None, "train")
    items = task.collate([ds[i] for i in range(4)])

    def draw(seed):
        np.random.seed(seed)
        torch.manual_seed(seed)
        return task.train_batch(items)

    a, b = draw(0), draw(0)
    assert torch.equal(a.y, b.y) and a.meta == b.meta
    assert a.y.shape[-1] * a.meta["scale"] == 48 and torch.equal(a.x_gt, items["hr"])
    assert any(draw(s).meta != a.meta for s in range(1, 6))


def test_runs_recorded_before_the_sampling_left_the_train_config_still_read():
    """The shipped base model (and any run of earlier versions) records the MRI sampling in its
    train_config: the MRI task reads it from there, and the recipe comparison ignores it."""
    import dataclasses

    from spade_deploy.checkpoint import load_model
    from spade_deploy.io import read_manifest
    from spade_deploy.pipeline import same_recipe
    from spade_deploy.mri.task import MRITask
    from spade_deploy.train import TrainConfig
    from spade_deploy.models import bundled_path

    shipped = bundled_path("deq", "small")
    manifest = read_manifest(shipped)
    assert "acceleration" in manifest["train_config"]  # recorded there before
    assert MRITask().recorded_options(manifest) == {"acceleration": 6, "center_fraction": 0.08}
    assert MRITask(6).same_options(manifest) and not MRITask(8).same_options(manifest)
    load_model(shipped)  # loads as before
    cfg = TrainConfig(epochs=1, lr=5e-4)
    legacy = {**cfg.record(), "acceleration": 6, "center_fraction": None}
    assert same_recipe(legacy, cfg) and not same_recipe({**legacy, "lr": 1e-4}, cfg)
    # Runs made before the learning-rate schedule existed ran at a constant rate.
    older = {k: v for k, v in legacy.items() if k != "lr_schedule"}
    assert same_recipe(older, cfg) and not same_recipe(older, dataclasses.replace(cfg, lr_schedule="cosine"))


def test_resume_refuses_other_task_options(tiny_dataset, tmp_path):
    """The task's options are part of a run: resuming with another sampling is refused."""
    from spade_deploy.mri import reader
    from spade_deploy.errors import SpadeError
    from spade_deploy.io import read_manifest
    from spade_deploy.losses import SupervisedLoss
    from spade_deploy.models import build_model
    from spade_deploy.mri.task import MRITask
    from spade_deploy.mri.deq import DEQTrainOptions
    from spade_deploy.train import TrainConfig, fit

    train = reader.SliceDataset(tiny_dataset.root / "train")
    cfg = TrainConfig(epochs=2, batch_size=2, max_steps_per_epoch=1, model_options=DEQTrainOptions(lipschitz_weight=0.0))
    class Killed(Exception):
        pass

    def kill_after_first_epoch(rec):
        raise Killed

    torch.manual_seed(0)
    with pytest.raises(Killed):
        fit(build_model("deq", preset="tiny"), SupervisedLoss(), train, None, cfg, tmp_path / "run", task=MRITask(6),
            on_epoch=kill_after_first_epoch)
    assert read_manifest(tmp_path / "run" / "last.safetensors")["task"]["acceleration"] == 6
    with pytest.raises(SpadeError, match="different training configuration"):
        fit(build_model("deq", preset="tiny"), SupervisedLoss(), train, None, cfg, tmp_path / "run", resume=True,
            task=MRITask(8))
    done = fit(build_model("deq", preset="tiny"), SupervisedLoss(), train, None, cfg, tmp_path / "run", resume=True,
               task=MRITask(6))
    assert [h["epoch"] for h in done.history] == [1, 2]


def test_a_checkpoint_of_another_task_is_one_error_line(tiny_dataset, tmp_path):
    """`spade bench` / `spade eval` given a model of another task than the command's data (an MRI
    DEQ beside a USRNet) refuse it in one line before anything is written, no traceback."""
    from typer.testing import CliRunner

    from cli.main import app
    from spade_deploy.checkpoint import save_model
    from spade_deploy.models import build_model

    torch.manual_seed(0)
    deq, usrnet = tmp_path / "deq.safetensors", tmp_path / "usrnet.safetensors"
    save_model(deq, build_model("deq", preset="tiny"))
    save_model(usrnet, build_model("usrnet", preset="tiny"))
    runner = CliRunner()
    for args in (["bench", str(deq), str(usrnet), "-b", "torch", "--data", str(tiny_dataset.root),
                  "--out", str(tmp_path / "bench"), "--repeats", "1"],
                 ["eval", str(usrnet), "--data", str(tiny_dataset.root), "--json", str(tmp_path / "e.json")]):
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        if args[0] == "bench":
            assert lines[-1].startswith("error:") and "usrnet model" in lines[-1], result.output
    assert not (tmp_path / "bench").exists() and not (tmp_path / "e.json").exists()
