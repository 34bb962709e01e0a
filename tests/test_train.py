"""The trainer: a short run raises validation PSNR; a killed run resumes from its last epoch."""

import pytest
import torch

from spade_deploy.mri import reader, simulate
from spade_deploy.checkpoint import load_model
from spade_deploy.errors import SpadeError
from spade_deploy.losses import SupervisedLoss
from spade_deploy.models import build_model
from spade_deploy.mri.deq import DEQTrainOptions
from spade_deploy.mri.task import MRITask
from spade_deploy.train import TrainConfig, evaluate, fit, scheduled_lr


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "tiny"
    cfg = simulate.SimConfig(train_volumes=3, train_slices=4, val_volumes=1, val_slices=2, test_volumes=1, test_slices=2, size=64)
    simulate.build_default_dataset(root, seed=1, config=cfg)
    return root


def _cfg(**kw):
    deq = dict(train_max_iter=20, train_tol=1e-3, lipschitz_weight=0.1, pretrain_steps=0)
    base = dict(epochs=3, lr=2e-3, batch_size=4)
    for k, v in kw.items():
        (deq if k in deq else base)[k] = v
    return TrainConfig(**base, model_options=DEQTrainOptions(**deq))


def test_short_training_raises_validation_psnr(tiny_root, tmp_path):
    torch.manual_seed(0)
    model = build_model("deq", preset="tiny")
    val = reader.SliceDataset(tiny_root / "val")
    before = evaluate(model, val, MRITask(6)).psnr
    result = fit(model, SupervisedLoss(), reader.SliceDataset(tiny_root / "train"), val, _cfg(epochs=4, pretrain_steps=80), tmp_path / "run")
    best, manifest = load_model(result.best_path)
    after = evaluate(best, val, MRITask(6))
    assert after.psnr > before + 1.0, (before, after.psnr)
    assert manifest["train_config"]["epochs"] == 4 and len(result.history) == 4


def test_a_diverged_run_stops_with_one_line_and_keeps_its_checkpoints(tiny_root, tmp_path):
    """A loss that turns NaN stops the run before the step: the last written checkpoint holds
    finite weights, and the error says where it diverged and what was kept."""

    class DivergesInSecondEpoch(SupervisedLoss):
        calls = 0

        def __call__(self, x_net, batch, model, teacher=None):
            self.calls += 1
            value = super().__call__(x_net, batch, model, teacher)
            # each sample's loss is computed alone: 4 a step, 2 steps an epoch
            return value * float("nan") if self.calls > 8 else value

    train, val = reader.SliceDataset(tiny_root / "train"), reader.SliceDataset(tiny_root / "val")
    torch.manual_seed(0)
    with pytest.raises(SpadeError, match=r"training diverged: the loss is nan at epoch 2, step 1; .*best\.safetensors holds"):
        fit(build_model("deq", preset="tiny"), DivergesInSecondEpoch(), train, val, _cfg(epochs=3, max_steps_per_epoch=2),
            tmp_path / "run")
    for name in ("best", "last"):
        model, _ = load_model(tmp_path / "run" / f"{name}.safetensors")
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_killed_run_resumes_from_last_epoch(tiny_root, tmp_path):
    """With the cosine schedule, so that the resumed run also continues the learning rate."""
    train, val = reader.SliceDataset(tiny_root / "train"), reader.SliceDataset(tiny_root / "val")
    cfg = _cfg(epochs=2, max_steps_per_epoch=2, lr_schedule="cosine")

    def kill_in_second_epoch(label, step, n, loss):
        if label.startswith("epoch 2"):
            raise KeyboardInterrupt

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit(build_model("deq", preset="tiny"), SupervisedLoss(), train, val, cfg, tmp_path / "run", on_step=kill_in_second_epoch)
    _, manifest = load_model(tmp_path / "run" / "last.safetensors")
    assert manifest["train_state"]["epoch"] == 1  # the finished epoch survived the kill

    torch.manual_seed(0)
    resumed = fit(build_model("deq", preset="tiny"), SupervisedLoss(), train, val, cfg, tmp_path / "run", resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]

    torch.manual_seed(0)
    straight = fit(build_model("deq", preset="tiny"), SupervisedLoss(), train, val, cfg, tmp_path / "straight")
    assert resumed.history[1]["train_loss"] == pytest.approx(straight.history[1]["train_loss"], rel=1e-4)

    torch.manual_seed(0)
    constant = fit(build_model("deq", preset="tiny"), SupervisedLoss(), train, val, _cfg(epochs=2, max_steps_per_epoch=2),
                   tmp_path / "constant")
    assert constant.history[1]["train_loss"] != pytest.approx(straight.history[1]["train_loss"], rel=1e-4)

    with pytest.raises(SpadeError, match="different training configuration"):
        fit(build_model("deq", preset="tiny"), SupervisedLoss(), train, val, _cfg(epochs=3, max_steps_per_epoch=2, lr=1e-4), tmp_path / "run", resume=True)


def test_cosine_schedule_decays_from_the_rate_to_zero():
    cfg = TrainConfig(lr=2e-3, lr_schedule="cosine")
    rates = [scheduled_lr(cfg, t, 10) for t in range(11)]
    assert rates[0] == pytest.approx(2e-3) and rates[5] == pytest.approx(1e-3) and rates[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert scheduled_lr(TrainConfig(lr=2e-3), 7, 10) == 2e-3
    with pytest.raises(SpadeError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_validation_every_other_epoch_keeps_the_best_validated_epoch(tiny_root, tmp_path):
    """``val_every=2`` over 3 epochs validates epochs 2 and 3 (the last always) and keeps the
    better of those two; the first epoch is never scored nor kept."""
    torch.manual_seed(0)
    val = reader.SliceDataset(tiny_root / "val")
    result = fit(build_model("deq", preset="tiny"), SupervisedLoss(), reader.SliceDataset(tiny_root / "train"), val,
                 _cfg(epochs=3, max_steps_per_epoch=1, val_every=2), tmp_path / "run")
    scored = [h["epoch"] for h in result.history if "val_psnr" in h]
    assert scored == [2, 3]
    best = [h for h in result.history if h.get("best")][-1]
    assert best["epoch"] in (2, 3) and best["val_psnr"] == max(h["val_psnr"] for h in result.history if "val_psnr" in h)
    assert result.best_val_psnr == best["val_psnr"]
    with pytest.raises(SpadeError, match="val_every"):
        TrainConfig(val_every=0)


def test_without_validation_the_last_epoch_is_kept(tiny_root, tmp_path):
    """``validate=False`` (the DEQ demo's fine-tuning, scored by the bench instead) never
    reconstructs the validation split and keeps the last epoch as best.safetensors."""
    torch.manual_seed(0)
    result = fit(build_model("deq", preset="tiny"), SupervisedLoss(), reader.SliceDataset(tiny_root / "train"),
                 reader.SliceDataset(tiny_root / "val"), _cfg(epochs=2, max_steps_per_epoch=1, validate=False),
                 tmp_path / "run")
    assert not any("val_psnr" in h for h in result.history)
    assert [h["epoch"] for h in result.history if h.get("best")][-1] == 2
    last, _ = load_model(result.last_path)
    best, _ = load_model(result.best_path)
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), best.state_dict().values()))
    with pytest.raises(SpadeError, match="validate"):
        TrainConfig(validate="no")
