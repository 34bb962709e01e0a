"""Fine-tuning strategies: what each needs, refused clearly when it is missing."""

import dataclasses

import h5py
import pytest
import torch

from spade_deploy.mri import reader, simulate
from spade_deploy.checkpoint import load_model, save_model
from spade_deploy.errors import SpadeError
from spade_deploy.finetune import finetune_model
from spade_deploy.models import build_model
from spade_deploy.mri.deq import DEQTrainOptions
from spade_deploy.prune import prune_checkpoint
from spade_deploy.train import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ft")
    root = base / "data"
    cfg = simulate.SimConfig(train_volumes=1, train_slices=2, val_volumes=1, val_slices=2, test_volumes=1, test_slices=2, size=48)
    simulate.build_default_dataset(root, seed=2, config=cfg)
    torch.manual_seed(0)
    teacher = save_model(base / "teacher.safetensors", build_model("deq", preset="tiny"))
    (student, _), = prune_checkpoint(teacher, [0.4], base / "pruned")
    return root, teacher, student


CFG = TrainConfig(epochs=1, lr=1e-4, batch_size=2, model_options=DEQTrainOptions(train_max_iter=10))


def _deq(cfg: TrainConfig, **options) -> TrainConfig:
    """``cfg`` with these DEQ options changed."""
    return dataclasses.replace(cfg, model_options=dataclasses.replace(cfg.model_options, **options))


@pytest.fixture(scope="module")
def shipped(setup, tmp_path_factory):
    """The shipped small DEQ (trained, its solves converge) and its pruning at 0.4, which costs it
    8 dB on the setup's test slices (26.7 -> 18.6)."""
    import shutil

    from spade_deploy.models import bundled_path

    base = tmp_path_factory.mktemp("shipped")
    teacher = base / "deq-small.safetensors"
    shutil.copyfile(bundled_path("deq", "small"), teacher)
    (student, _), = prune_checkpoint(teacher, [0.4], base / "pruned")
    return setup[0], teacher, student


@pytest.mark.parametrize("strategy, lr", [("school", 5e-4), ("self-supervised", 2e-4)])  # the demo's rates
def test_teacher_and_measurement_strategies_learn_from_the_test_measurements(shipped, tmp_path, strategy, lr):
    """School and self-supervised fine-tuning of a pruned model on the test measurements (no ground
    truth) give back part of what pruning cost on those measurements: at least 0.5 dB after four
    epochs of one step (measured: school +0.75 dB, self-supervised +1.17 dB), converging still. School's
    loss, the distance to the teacher's reconstructions, falls by a fifth or more (measured 45 %).
    The contraction penalty is off here, so the loss is the strategy's alone (with it on, the penalty
    pulls against that loss); tests/test_heldout.py checks what the penalty holds."""
    from spade_deploy.mri.task import MRITask
    from spade_deploy.train import evaluate

    root, teacher, student = shipped
    test = reader.SliceDataset(root / "test")
    before = evaluate(load_model(student)[0], test, MRITask(6))
    options = DEQTrainOptions(train_max_iter=10, lipschitz_weight=0.0)
    cfg = TrainConfig(epochs=4, lr=lr, batch_size=2, model_options=options)
    result = finetune_model(student, strategy, root, tmp_path / strategy, cfg, checkpoint_seconds=None)
    model, manifest = load_model(result.best_path)
    assert manifest["finetune"]["strategy"] == strategy
    assert manifest["finetune"]["data"].endswith("test")
    assert manifest["pruning"]["ratio"] == 0.4  # still recognised as pruned
    assert model.prior.head.out_channels == 19  # int(32 * 0.6)
    after = evaluate(model, test, MRITask(6))
    assert after.all_converged and after.psnr >= before.psnr + 0.5, (before.psnr, after.psnr)
    if strategy == "school":
        losses = [h["train_loss"] for h in result.history]
        assert losses[-1] <= 0.8 * losses[0], losses


def test_school_runs_share_the_teachers_reconstructions_only_with_that_teacher(setup, tmp_path, monkeypatch):
    """Two school runs with one teacher on the same measurements (the demo's pruned models)
    reconstruct each test slice with the teacher once; a teacher with other weights is run again."""
    from spade_deploy.losses import SchoolLoss
    from spade_deploy.mri.deq import DEQ

    root, teacher, student = setup
    monkeypatch.setattr(SchoolLoss, "_SHARED", {})  # not what the tests before left
    calls = []
    forward = DEQ.forward

    def counted(self, y, physics, solver=None):
        if self.prior.head.out_channels == 16:  # the unpruned teacher, not the pruned student
            calls.append(y.shape[0])
        return forward(self, y, physics, solver)

    monkeypatch.setattr(DEQ, "forward", counted)
    cfg = dataclasses.replace(_deq(CFG, lipschitz_weight=0.0), epochs=2)  # no parent measurement: teacher calls only
    finetune_model(student, "school", root, tmp_path / "one", cfg, teacher_path=teacher)
    assert sum(calls) == 2  # the two test slices, once each over both epochs
    finetune_model(student, "school", root, tmp_path / "two", cfg, teacher_path=teacher)
    assert sum(calls) == 2
    other_model, _ = load_model(teacher)
    with torch.no_grad():
        other_model.prior.tail.weight.mul_(0.5)
    other = save_model(tmp_path / "other-teacher.safetensors", other_model)
    finetune_model(student, "school", root, tmp_path / "three", cfg, teacher_path=other)
    assert sum(calls) == 4


def test_supervised_needs_ground_truth(setup, tmp_path):
    root, teacher, student = setup
    no_gt = tmp_path / "no-gt"
    (no_gt / "train").mkdir(parents=True)
    src = next((root / "train").glob("*.h5"))
    with h5py.File(src) as f, h5py.File(no_gt / "train" / src.name, "w") as g:
        g["kspace"] = f["kspace"][()]
        g["sens_maps"] = f["sens_maps"][()]
    with pytest.raises(SpadeError, match="needs ground truth"):
        finetune_model(student, "supervised", no_gt, tmp_path / "out", CFG)


def test_teacher_of_another_architecture_is_refused(setup, tmp_path):
    root, teacher, student = setup
    other = save_model(tmp_path / "other.safetensors", build_model("deq", preset="small"))
    with pytest.raises(SpadeError, match="another architecture"):
        finetune_model(student, "school", root, tmp_path / "out", CFG, teacher_path=other)
    with pytest.raises(SpadeError, match="unknown strategy"):
        finetune_model(student, "telepathy", root, tmp_path / "out", CFG)


def test_deq_self_supervised_loss_is_unchanged():
    """The DEQ's fidelity stays ``A x`` with the given coil maps, and the whole loss (fidelity plus
    equivariant imaging) is numerically the one before the VarNet k-space seam."""
    from spade_deploy.losses import SelfSupervisedLoss, relative_sq_error
    from spade_deploy.physics import random_quarter_turns, rotate_images as rotate
    from spade_deploy.tasks import Batch
    from spade_deploy.mri.physics import MultiCoilMRI, equispaced_mask

    torch.manual_seed(0)
    model = build_model("deq", preset="tiny")
    g = torch.Generator().manual_seed(1)
    b, c, h, w = 2, 3, 32, 32
    mask = torch.stack([torch.from_numpy(equispaced_mask(w, 0.08, 4, seed=i)) for i in range(b)]).view(b, 1, 1, w)
    smaps = torch.randn(b, c, h, w, dtype=torch.complex64, generator=g)
    physics = MultiCoilMRI(mask, smaps / smaps.abs().pow(2).sum(1, keepdim=True).sqrt())
    y = physics.A(torch.randn(b, h, w, dtype=torch.complex64, generator=g))
    batch = Batch(y, physics, None, None, keys=[("f", 0)] * b, meta={"maxval": torch.ones(b)})
    with torch.no_grad():
        x = model(y, physics)
        loss = SelfSupervisedLoss()
        assert torch.equal(loss.fidelity(x, batch, model), relative_sq_error(physics.A(x), y))
        torch.manual_seed(5)
        new = loss(x, batch, model)
        torch.manual_seed(5)
        ks = random_quarter_turns(x)
        x_phi, physics_phi = rotate(x, ks), physics.rotate(ks)
        old = relative_sq_error(physics.A(x), y) + relative_sq_error(model(physics_phi.A(x_phi), physics_phi), x_phi)
    assert torch.equal(new, old)


def test_pruned_deq_fine_tuned_needs_no_more_iterations_than_its_parent(tiny_dataset, tmp_path):
    """The contraction target is measured on the unpruned parent (||J_T|| at its own fixed points on
    the training data) and recorded; the fine-tuned pruned DEQ then converges in at most the
    parent's mean number of iterations on the test slices, where pruning alone left it on the cap."""
    from spade_deploy.finetune import measure_contraction
    from spade_deploy.losses import SupervisedLoss
    from spade_deploy.train import evaluate, fit

    root = tiny_dataset.root
    train, val, test = (reader.SliceDataset(root / s) for s in ("train", "val", "test"))
    torch.manual_seed(0)  # 200 denoiser steps: after 100 the tiny parent itself stops on the cap
    base = TrainConfig(epochs=2, lr=2e-3, batch_size=4, model_options=DEQTrainOptions(
        train_max_iter=30, pretrain_steps=200, lipschitz_weight=10.0, lipschitz_target=0.98, lipschitz_on="prior"))
    parent_path = fit(build_model("deq", preset="tiny"), SupervisedLoss(), train, val, base, tmp_path / "base").best_path
    parent, _ = load_model(parent_path)
    before = evaluate(parent, test)
    assert before.all_converged

    (pruned_path, _), = prune_checkpoint(parent_path, [0.4], tmp_path / "pruned")
    assert not evaluate(load_model(pruned_path)[0], test).all_converged  # pruning alone: on the cap

    cfg = TrainConfig(epochs=20, lr=5e-4, batch_size=2,
                      model_options=DEQTrainOptions(train_max_iter=30, lipschitz_weight=30.0))
    assert cfg.model_options.lipschitz_target is None  # the default: measured on the parent
    result = finetune_model(pruned_path, "supervised", root, tmp_path / "ft", cfg)
    tuned, manifest = load_model(result.best_path)
    after = evaluate(tuned, test)

    measured = measure_contraction(parent, train, dataclasses.replace(cfg, fixed_masks=False))
    c = manifest["contraction"]
    assert c["source"] == "parent" and c["parent"] == str(parent_path)
    assert c["target"] == pytest.approx(measured["median"]) and 0.5 < c["target"] < 1
    assert manifest["train_config"]["lipschitz_target"] == pytest.approx(c["target"])
    assert after.all_converged
    assert after.mean_iterations <= before.mean_iterations, (after.mean_iterations, before.mean_iterations)


def test_contraction_target_given_or_unmeasurable(setup, tmp_path):
    root, teacher, student = setup
    result = finetune_model(student, "self-supervised", root, tmp_path / "user",
                            _deq(CFG, lipschitz_target=0.9))
    _, manifest = load_model(result.best_path)
    assert manifest["contraction"] == {"target": 0.9, "source": "user"}

    # a pruned checkpoint whose parent has gone cannot measure it: a clear error, not a guess
    orphan = tmp_path / "orphan.safetensors"
    model, man = load_model(student)
    save_model(orphan, model, pruning={**man["pruning"], "parent": str(tmp_path / "gone.safetensors")})
    with pytest.raises(SpadeError, match="--lipschitz-target"):
        finetune_model(orphan, "self-supervised", root, tmp_path / "out", CFG)


def test_resumed_fine_tuning_keeps_the_target_it_measured(setup, tmp_path):
    root, teacher, _ = setup
    parent = tmp_path / "parent.safetensors"
    parent.write_bytes(teacher.read_bytes())
    (student, _), = prune_checkpoint(parent, [0.4], tmp_path / "pruned")
    cfg = dataclasses.replace(CFG, epochs=2)

    def kill_in_second_epoch(label, step, n, loss):
        if label.startswith("epoch 2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_model(student, "self-supervised", root, tmp_path / "run", cfg, on_step=kill_in_second_epoch)
    _, manifest = load_model(tmp_path / "run" / "last.safetensors")
    target = manifest["contraction"]["target"]
    assert manifest["contraction"]["source"] == "parent" and len(manifest["contraction"]["norms"]) == 2
    parent.unlink()  # resuming does not measure again: it continues with the value it started with
    again = finetune_model(student, "self-supervised", root, tmp_path / "run", cfg, resume=True)
    _, manifest = load_model(again.last_path)
    assert manifest["train_config"]["lipschitz_target"] == target and manifest["train_state"]["epoch"] == 2


def test_demo_reuses_a_fine_tuning_whose_target_was_measured():
    """``spade demo`` reuses finished stages whose recorded recipe is its own: a target measured on
    the parent (the recipe leaves it to be measured) is still the same recipe; another given one is not."""
    from spade_deploy.pipeline import same_recipe

    recipe = TrainConfig(epochs=1, lr=5e-4, model_options=DEQTrainOptions())
    stored = dataclasses.replace(_deq(recipe, lipschitz_target=0.9531), fixed_masks=True).record()
    assert same_recipe(stored, recipe)
    assert not same_recipe(stored, _deq(recipe, lipschitz_target=0.96))
    assert not same_recipe(stored, dataclasses.replace(recipe, lr=1e-4))
