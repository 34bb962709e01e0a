"""The command line: bad input gives one line on stderr and exit status 1, never a traceback."""

import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from spade_deploy.checkpoint import save_model
from spade_deploy.io import load_checkpoint, save_checkpoint
from spade_deploy.models import build_model

from cli.main import app

runner = CliRunner()
SPADE = str(Path(sys.executable).parent / "spade")  # the venv's own command, not whichever is first on PATH


def _fails_cleanly(args, match):
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    out = result.stderr.strip()
    assert out.startswith("error:") and len(out.splitlines()) == 1, out
    assert match in out, out
    return out


@pytest.fixture()
def data_root(tmp_path):
    """A dataset root whose test split has one tiny, valid fastMRI-format file."""
    root = tmp_path / "data"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
    rng = np.random.default_rng(0)
    # 48 columns: fastMRI's 8 % centre at acceleration 6 gives 4 ACS lines to estimate coil maps from
    k = (rng.standard_normal((2, 4, 16, 48)) + 1j * rng.standard_normal((2, 4, 16, 48))).astype(np.complex64)
    with h5py.File(root / "test" / "file.h5", "w") as f:
        f["kspace"] = k
        f["reconstruction_rss"] = np.abs(k).sum(1).astype(np.float32)
        f.attrs["max"] = 1.0
    return root


def test_models_lists_the_registry():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "999,428" in result.output  # the paper preset


def test_unknown_model_and_preset(tmp_path):
    _fails_cleanly(["train", "--model", "unet3d", "--data", str(tmp_path), "--out", str(tmp_path / "o")], "unknown model")
    _fails_cleanly(["train", "--preset", "giant", "--data", str(tmp_path), "--out", str(tmp_path / "o")], "unknown preset")


def test_missing_and_pickled_checkpoints(tmp_path, data_root):
    _fails_cleanly(["eval", str(tmp_path / "nope.safetensors"), "--data", str(data_root)], "not found")
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"a": 1}))
    _fails_cleanly(["eval", str(evil), "--data", str(data_root)], "not a spade-deploy checkpoint")


def test_eval_on_bad_data(tmp_path, data_root):
    ckpt = save_model(tmp_path / "m.safetensors", build_model("deq", preset="tiny"))
    _fails_cleanly(["eval", str(ckpt), "--data", str(tmp_path / "missing")], "missing")
    bad = data_root / "val"
    with h5py.File(bad / "x.h5", "w") as f:
        f["image"] = np.zeros((1, 8, 8), np.float32)
    _fails_cleanly(["eval", str(ckpt), "--data", str(data_root), "--split", "val"], "kspace")
    with h5py.File(data_root / "train" / "rank.h5", "w") as f:
        f["kspace"] = np.zeros((4, 16, 16), np.complex64)
    _fails_cleanly(["eval", str(ckpt), "--data", str(data_root), "--split", "train"], "rank")
    with h5py.File(data_root / "test" / "file.h5", "a") as f:
        k = f["kspace"][()]
        k[0, 0, 0, 0] = np.nan
        f["kspace"][...] = k
    _fails_cleanly(["eval", str(ckpt), "--data", str(data_root)], "NaN")


def test_train_output_path_that_is_a_file(tmp_path, data_root):
    out = tmp_path / "taken"
    out.write_text("keep me")
    _fails_cleanly(["train", "--preset", "tiny", "--data", str(data_root), "--out", str(out), "--epochs", "1"], "is a file")
    assert out.read_text() == "keep me"


# VarNet / E2E-VarNet bad input (issue 4): a checkpoint with another number of cascades than its
# tensors, coil maps of the wrong shape, an acquisition mask that does not fit the k-space.
TINY_VARNET = dict(num_cascades=2, chans=4, pools=2, sens_chans=2, sens_pools=2)


@pytest.mark.parametrize("name", ["varnet", "e2e-varnet"])
def test_varnet_checkpoint_with_another_cascade_count(tmp_path, data_root, name):
    state, manifest = load_checkpoint(save_model(tmp_path / "v.safetensors", build_model(name, config=TINY_VARNET)))
    for cascades, match in ((3, "does not match the architecture"), (1, "which this architecture does not have")):
        bad = save_checkpoint(tmp_path / f"c{cascades}.safetensors", state,
                              {**manifest, "config": {**manifest["config"], "num_cascades": cascades}})
        _fails_cleanly(["eval", str(bad), "--data", str(data_root)], match)
        _fails_cleanly(["reconstruct", str(bad), str(data_root / "test"), "-o", str(tmp_path / "rec")], match)


def test_varnet_coil_maps_of_the_wrong_shape(tmp_path, data_root):
    ckpt = save_model(tmp_path / "v.safetensors", build_model("varnet", config=TINY_VARNET))
    with h5py.File(data_root / "test" / "file.h5", "a") as f:
        f["sens_maps"] = np.ones((2, 4, 16, 15), np.complex64)
    _fails_cleanly(["eval", str(ckpt), "--data", str(data_root)], "sens_maps of shape (2, 4, 16, 15) does not match kspace")
    _fails_cleanly(["reconstruct", str(ckpt), str(data_root / "test"), "-o", str(tmp_path / "rec")], "sens_maps of shape")


@pytest.mark.parametrize("mask,match", [
    (np.ones(15), "mask of shape (15,) does not match kspace of width 48"),
    (np.ones((48, 48)), "mask of shape (48, 48) does not match kspace"),
    (np.full(48, np.nan), "only 0 and 1"),
    (np.zeros(48), "samples no k-space column"),
    (np.arange(48) % 2 == 1, "does not sample the centre column"),
])
@pytest.mark.parametrize("command", ["reconstruct", "eval", "bench", "finetune"])
def test_every_command_refuses_a_mask_that_does_not_fit_the_kspace(tmp_path, data_root, mask, match, command):
    ckpt = save_model(tmp_path / "e2e.safetensors", build_model("e2e-varnet", config=TINY_VARNET))
    with h5py.File(data_root / "test" / "file.h5", "a") as f:
        f["mask"] = mask.astype(np.float32)
    args = {
        "reconstruct": ["reconstruct", str(ckpt), str(data_root / "test"), "-o", str(tmp_path / "rec")],
        "eval": ["eval", str(ckpt), "--data", str(data_root)],
        "bench": ["bench", str(ckpt), "-b", "torch", "--data", str(data_root), "-o", str(tmp_path / "rec")],
        "finetune": ["finetune", str(ckpt), "-s", "self-supervised", "--data", str(data_root), "-o", str(tmp_path / "rec")],
    }[command]
    _fails_cleanly(args, match)
    assert not (tmp_path / "rec").exists() or not any((tmp_path / "rec").iterdir())


def test_reconstruct_uses_an_acquired_mask_that_fits(tmp_path, data_root):
    ckpt = save_model(tmp_path / "e2e.safetensors", build_model("e2e-varnet", config=TINY_VARNET))
    with h5py.File(data_root / "test" / "file.h5", "a") as f:
        f["mask"] = (np.arange(48) % 4 == 0) | (np.abs(np.arange(48) - 24) < 3)
    result = runner.invoke(app, ["reconstruct", str(ckpt), str(data_root / "test"), "-o", str(tmp_path / "rec")])
    assert result.exit_code == 0, result.output
    with h5py.File(tmp_path / "rec" / "file.h5") as f:
        assert f["reconstruction"].shape == (2, 16, 48) and np.isfinite(f["reconstruction"][()]).all()


def test_bench_of_two_architectures_from_like_named_run_folders(tmp_path, data_root):
    """The demo's <out>/<model>/base/best.safetensors for two models: each gets its own export
    (one shared name made one model's priors replace the other's)."""
    paths = [save_model(tmp_path / name / "base" / "best.safetensors", build_model(name, config=TINY_VARNET))
             for name in ("varnet", "e2e-varnet")]
    engines = tmp_path / "engines"
    result = runner.invoke(app, ["bench", *map(str, paths), "-b", "torch", "-b", "onnxruntime", "--repeats", "1",
                                 "--warmup", "0", "--data", str(data_root), "--engines", str(engines), "-o", str(tmp_path / "res")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in engines.glob("*.manifest.json")) == [
        "e2e-varnet.base.best.manifest.json", "varnet.base.best.manifest.json"]


@pytest.mark.parametrize("argv", [["train", "--epochs", "abc"], ["prune", "x.safetensors", "--bogus"], ["eval"],
                                  ["finetune", "x.safetensors", "--lr", "fast"]])
def test_malformed_command_line_is_one_error_line(argv, tmp_path):
    """The installed `spade` turns click's usage errors (a value of the wrong type, an unknown
    option, a missing argument) into one `error:` line and exit status 1, writing nothing."""
    proc = subprocess.run([SPADE, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert [line for line in out.splitlines() if line.strip()] == [out.strip()], out
    assert out.startswith("error: spade ") and "Traceback" not in out
    assert list(tmp_path.iterdir()) == []
