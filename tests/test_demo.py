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


def test_library_demo_runs_the_pipeline_and_reuses_finished_stages(tiny_dataset, tmp_path):
    out = tmp_path / "demo"
    rec = Recorder()
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
    assert all(r.psnr > 0 for r in bench.result.rows)
    # the pruned model before fine-tuning is scored, not timed; every deployable variant is timed
    assert [r.latency_ms is None for r in bench.result.rows] == [False, True, False, False, False]
    assert all(r.latency_ms > 0 for r in bench.result.rows if r.strategy != "none")
    saved = json.loads((out / "results" / "bench-deq.json").read_text())
    assert [r["strategy"] for r in saved["rows"]] == [s for _, s in rows]
    assert "psnr_sense" in saved["rows"][0] and "scores" not in saved["rows"][0]  # the task's columns, flat
    assert "SENSE PSNR" in (out / "results" / "bench-deq.md").read_text()

    # A second run trains, prunes and fine-tunes nothing: every stage is finished with the same
    # recipe, from the same files.
    stamps = {p: p.stat().st_mtime_ns for p in [made.base, *made.pruned, *made.finetuned]}
    again = Recorder()
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
    run_demo(out, ["deq"], backends=["torch"], repeats=1, reporter=third, recipes={"deq": TINY_DEQ},
             data={"mri": tiny_dataset.root})
    notes = [e[1] for e in third.events if e[0] == "note"]
    assert sum(n.startswith("fine-tuned") for n in notes) == 3, notes


def test_library_demo_refuses_a_model_without_recipe(tmp_path):
    from spade_deploy.errors import SpadeError

    with pytest.raises(SpadeError, match="no demo recipe for 'unet'"):
        run_demo(tmp_path / "demo", ["unet"])
    assert not (tmp_path / "demo").exists()
