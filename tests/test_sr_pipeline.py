"""USRNet through the CLI on the embedded photographs: train -> prune -> the three fine-tuning
strategies -> export -> eval (a row per kernel) -> reconstruct a folder of LR images on PyTorch
and on onnxruntime (same PNGs) -> bench. Tiny sizes: this checks the wiring, not the quality."""

from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()
SR = ["--scale", "2", "--kernel", "k1"]


def _ok(args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sr")
    torch.manual_seed(0)
    _ok(["train", "-m", "usrnet", "--preset", "tiny", "--epochs", "1", "--max-steps", "2", "--batch-size", "2",
         "--lr", "1e-3", "-o", root / "base", *SR])
    _ok(["prune", root / "base" / "best.safetensors", "-r", "0.4", "-o", root / "pruned"])
    return root


def test_train_records_the_task_and_eval_prints_a_row_per_kernel(runs, tmp_path):
    from spade_deploy.io import read_manifest

    manifest = read_manifest(runs / "base" / "best.safetensors")
    assert manifest["task"]["name"] == "sr" and manifest["task"]["scales"] == [2]
    res = _ok(["eval", runs / "base" / "best.safetensors", "--scale", "2", "--scale", "3", "--kernel", "k1",
               "--kernel", "k9", "--json", tmp_path / "e.json"])
    lines = [line for line in res.output.splitlines() if line.startswith("│ k")]
    assert [line.split()[1] for line in lines] == ["k1", "k9"]
    data = json.loads((tmp_path / "e.json").read_text())
    assert [(r["scale"], r["kernel"]) for r in data["rows"]] == [(2, "k1"), (2, "k9"), (3, "k1"), (3, "k9")]
    # the bicubic baseline is the task's, scored like the model: sharp kernel k1 at x2 is its easiest case
    assert data["rows"][0]["psnr_bicubic"] > data["rows"][1]["psnr_bicubic"] > 10


@pytest.mark.parametrize("strategy", ["school", "supervised", "self-supervised"])
def test_finetune_strategies_run_on_usrnet(runs, strategy):
    from spade_deploy.checkpoint import load_model

    pruned = runs / "pruned" / "best.pruned-0.4.safetensors"
    out = runs / f"ft-{strategy}"
    _ok(["finetune", pruned, "-s", strategy, "--epochs", "1", "--max-steps", "1", "--batch-size", "2", "--lr", "1e-4",
         "-o", out, *SR])
    before, _ = load_model(pruned)
    after, manifest = load_model(out / "last.safetensors")
    assert manifest["finetune"]["strategy"] == strategy
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


def test_reconstruct_a_folder_of_lr_images_on_torch_and_onnxruntime(runs, tmp_path):
    lr = tmp_path / "lr"
    lr.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(lr / "a.png")
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(lr / "grey.png")  # converted to RGB
    ckpt = runs / "pruned" / "best.pruned-0.4.safetensors"
    outs = {}
    for backend in ("torch", "onnxruntime"):
        _ok(["reconstruct", ckpt, lr, "-o", tmp_path / backend, "-b", backend, "--engines", tmp_path / "eng",
             "--scale", "3", "--kernel", "k2"])
        outs[backend] = {p.name: np.array(Image.open(p)) for p in sorted((tmp_path / backend).iterdir())}
    assert outs["torch"]["a.png"].shape == (60, 90, 3) and outs["torch"]["grey.png"].shape == (48, 48, 3)
    for name in outs["torch"]:
        assert np.abs(outs["torch"][name].astype(int) - outs["onnxruntime"][name]).max() <= 1
    assert sorted(p.name for p in lr.iterdir()) == ["a.png", "grey.png"]  # nothing written beside the inputs


def test_bench_scores_and_times_usrnet_variants(runs, tmp_path):
    _ok(["bench", runs / "base" / "best.safetensors", runs / "pruned" / "best.pruned-0.4.safetensors",
               "-b", "torch", "-b", "onnxruntime", "--repeats", "1", "--warmup", "0", "--engines", tmp_path / "eng",
               "-o", tmp_path / "res", *SR])
    data = json.loads((tmp_path / "res" / "bench.json").read_text())
    assert data["baseline"] == "bicubic" and data["config"]["scales"] == [2]
    rows = {(r["ratio"], r["backend"]): r for r in data["rows"]}
    assert set(rows) == {(0.0, "torch"), (0.0, "onnxruntime"), (0.4, "torch"), (0.4, "onnxruntime")}
    # the exported prior reproduces PyTorch's scores
    assert rows[(0.4, "onnxruntime")]["psnr"] == pytest.approx(rows[(0.4, "torch")]["psnr"], abs=0.01)
    assert rows[(0.4, "torch")]["params"] < rows[(0.0, "torch")]["params"]
    assert (tmp_path / "res" / "bench-usrnet-examples.png").exists()
