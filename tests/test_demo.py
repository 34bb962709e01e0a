"""The demo as a library call: the whole pipeline (train, evaluate, prune, fine-tune with every
strategy, export, bench) from Python, without the command line, and a second run that reuses
every finished stage."""

from __future__ import annotations

import json

import pytest
import torch

from spade_deploy.checkpoint import load_model, save_model
from spade_deploy.demo import DemoReporter, run_demo
from spade_deploy.models import DemoRecipe
from spade_deploy.mri.deq import DEQTrainOptions
from spade_deploy.train import TrainConfig

STEP = dict(epochs=1, batch_size=2, max_steps_per_epoch=1, model_options=DEQTrainOptions(lipschitz_weight=0.0))
TINY_DEQ = DemoRecipe(
    preset="tiny",
    train=TrainConfig(lr=1e-3, **STEP),
    finetune={s: TrainConfig(lr=1e-4, **STEP) for s in ("supervised", "school", "self-supervised")},
    ratios=(0.4,),
    hardware_widths=False,
)


class Recorder(DemoReporter):
    def __init__(self):
        self.events = []

    def note(self, text):
        self.events.append(("note", text))

    def stage(self, title):
        self.events.append(("stage", title))

    def evaluated(self, evaluation):
        self.events.append(("evaluated", evaluation))

    def pruned(self, checkpoint, results, size):
        self.events.append(("pruned", [p for p, _ in results]))

    def benched(self, run):
        self.events.append(("benched", run))


def conv_macs(model, height: int, width: int) -> int:
    """Multiply-accumulates of one call of the model's priors' convolutions on a ``height x width`` slice."""
    from spade_deploy.hwaware import conv_kinds

    return sum(k.macs for name, prior in model.priors().items()
               for k in conv_kinds(prior, model.prior_example_input(name, height, width)).values())


def test_library_demo_runs_the_pipeline_and_reuses_finished_stages(tiny_dataset, tmp_path, monkeypatch):
    import functools

    import spade_deploy.bench
    from spade_deploy.mri.reader import SliceDataset
    from spade_deploy.mri.task import MRITask
    from spade_deploy.train import evaluate
    from test_hwaware import MacClock

    # The bench's clock advances one nanosecond per multiply-accumulate of the convolutions run
    # (tests/test_hwaware.py): what it times is then known exactly, on any machine.
    clock = MacClock()
    monkeypatch.setattr(spade_deploy.bench, "run_bench", functools.partial(spade_deploy.bench.run_bench, timer=clock))
    out = tmp_path / "demo"
    rec = Recorder()
    with clock:
        result = run_demo(out, ["deq"], backends=["torch"], repeats=1, reporter=rec, recipes={"deq": TINY_DEQ},
                          data={"mri": tiny_dataset.root})
    stages = [e[1] for e in rec.events if e[0] == "stage"]
    assert stages == ["deq: train (tiny preset)", "deq: SPADE prune", "deq: SPADE fine-tune", "SPADE: export + bench"]
    (made,) = result.models
    assert made.base == out / "deq" / "base" / "best.safetensors" and made.base.is_file()
    assert [p.name for p in made.pruned] == ["best.pruned-0.4.safetensors"]
    assert len(made.finetuned) == 3 and all(p.is_file() for p in made.finetuned)
    # the base model's scores on the test split, also written where the demo keeps them
    scores = json.loads((out / "deq" / "eval-test.json").read_text())
    assert scores["psnr"] == pytest.approx(made.evaluation.scores.psnr)
    assert scores["task"] == {"name": "mri", "acceleration": 6, "center_fraction": 0.08, "coil_maps": "espirit"}
    # one bench over the unpruned, the pruned and the three fine-tuned models, written as files
    bench = result.benches["mri"]
    rows = [(r.ratio, r.strategy) for r in bench.result.rows]
    assert rows == [(0.0, None), (0.4, "none"), (0.4, "supervised"), (0.4, "school"), (0.4, "self-supervised")]
    # every row is scored on its own model: fastMRI's scores of that checkpoint, reconstructed as the
    # bench does (a timed variant one slice per call, the untimed one in a batch); five models, five
    # different scores
    test = SliceDataset(tiny_dataset.root / "test")
    checkpoints = [made.base, made.pruned[0], *made.finetuned]
    models = [load_model(p)[0] for p in checkpoints]
    for row, model in zip(bench.result.rows, models):
        alone = evaluate(model, test, MRITask(6, 0.08), batch_size=1 if row.latency_ms is not None else 4)
        assert row.psnr == pytest.approx(alone.psnr, abs=1e-6) and row.ssim == pytest.approx(alone.ssim, abs=1e-8)
    assert len({round(r.psnr, 6) for r in bench.result.rows}) == 5
    # the pruned model before fine-tuning is scored, not timed; every deployable variant is timed on
    # its own reconstructions: each slice's latency is its prior's convolutions times the iterations
    # it ran on that slice, and the speed-ups are the ratios of those latencies
    assert [r.latency_ms is None for r in bench.result.rows] == [False, True, False, False, False]
    h, w = test[0]["kspace"].shape[-2:]  # the priors run at the k-space's size
    for row, model in zip(bench.result.rows, models):
        if row.latency_ms is not None:
            per_call_ms = conv_macs(model, h, w) * 1e-6
            assert row.slice_latency_ms == pytest.approx([per_call_ms * n for n in row.slice_iterations], rel=1e-9)
            assert row.speedup_vs_torch == pytest.approx(bench.result.rows[0].latency_ms / row.latency_ms)
    saved = json.loads((out / "results" / "bench-deq.json").read_text())
    assert [r["strategy"] for r in saved["rows"]] == [s for _, s in rows]
    assert "psnr_sense" in saved["rows"][0] and "scores" not in saved["rows"][0]  # the task's columns, flat
    assert "SENSE PSNR" in (out / "results" / "bench-deq.md").read_text()

    # A second run trains, prunes and fine-tunes nothing: every stage is finished with the same
    # recipe, from the same files.
    stamps = {p: p.stat().st_mtime_ns for p in [made.base, *made.pruned, *made.finetuned]}
    again = Recorder()
    with clock:
        second = run_demo(out, ["deq"], backends=["torch"], repeats=1, reporter=again, recipes={"deq": TINY_DEQ},
                          data={"mri": tiny_dataset.root})
    notes = [e[1] for e in again.events if e[0] == "note"]
    assert any(n.startswith("Reusing the trained base model") for n in notes), notes
    assert any(n.startswith("Reusing the pruned models") for n in notes), notes
    assert not any(n.startswith(("Training", "fine-tuned")) for n in notes), notes
    assert not any(e[0] == "pruned" for e in again.events)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert [r.psnr for r in second.benches["mri"].result.rows] == [r.psnr for r in bench.result.rows]

    # A pruned model that changed (pruned again elsewhere, edited) is not benched with runs
    # fine-tuned from its old bytes: they are fine-tuned again.
    model, manifest = load_model(made.pruned[0])
    with torch.no_grad():
        model.prior.tail.weight.mul_(0.5)
    save_model(made.pruned[0], model, **{k: v for k, v in manifest.items() if k in ("pruning", "train_config")})
    third = Recorder()
    with clock:
        run_demo(out, ["deq"], backends=["torch"], repeats=1, reporter=third, recipes={"deq": TINY_DEQ},
                 data={"mri": tiny_dataset.root})
    notes = [e[1] for e in third.events if e[0] == "note"]
    assert sum(n.startswith("fine-tuned") for n in notes) == 3, notes


def test_library_demo_refuses_a_model_without_recipe(tmp_path):
    from spade_deploy.errors import SpadeError

    with pytest.raises(SpadeError, match="no demo recipe for 'unet'"):
        run_demo(tmp_path / "demo", ["unet"])
    assert not (tmp_path / "demo").exists()


def test_library_demo_does_not_fine_tune_measured_widths_that_buy_nothing(tiny_dataset, tmp_path, monkeypatch):
    """A device where no width below the parent's runs faster (the injected timer): the measured
    widths keep every group whole, so the demo prunes them, says the ratio buys nothing here, and
    spends no fine-tuning on them; the paper-exact variant is still fine-tuned, for reproduction.
    The result files say which variant was left out and why."""
    import dataclasses

    import spade_deploy.pipeline as pipeline
    from test_hwaware import WholeIsFastest

    monkeypatch.setattr(pipeline, "default_timer", lambda device=None: WholeIsFastest())
    recipe = dataclasses.replace(TINY_DEQ, hardware_widths=True, score_unfinetuned=False)
    out = tmp_path / "demo"
    rec = Recorder()
    result = run_demo(out, ["deq"], backends=["torch"], repeats=1, reporter=rec, recipes={"deq": recipe},
                      data={"mri": tiny_dataset.root})
    (made,) = result.models
    assert [p.name for p in made.pruned] == ["best.pruned-0.4.safetensors"]
    assert len(made.finetuned) == 3 and all("hw" not in p.parent.name for p in made.finetuned)
    assert len(made.idle) == 1 and made.idle[0].startswith("best.pruned-0.4.hw.safetensors: ratio 0.4 buys nothing")
    assert (out / "deq" / "pruned" / "best.pruned-0.4.hw.safetensors").is_file()  # pruned, kept, not fine-tuned
    notes = [e[1] for e in rec.events if e[0] == "note"]
    assert any("buys nothing" in n and "not fine-tuned" in n for n in notes), notes
    md = (out / "results" / "bench-deq.md").read_text()
    assert "Note: deq: best.pruned-0.4.hw.safetensors: ratio 0.4 buys nothing" in md
    assert [r.widths for r in result.benches["mri"].result.rows] == [None, "paper", "paper", "paper"]
    # a second run reuses the pruned models and still leaves the measured widths out
    again = Recorder()
    run_demo(out, ["deq"], backends=["torch"], repeats=1, reporter=again, recipes={"deq": recipe},
             data={"mri": tiny_dataset.root})
    notes = [e[1] for e in again.events if e[0] == "note"]
    assert any("buys nothing" in n for n in notes) and not any(n.startswith("fine-tuned") for n in notes), notes
