"""Archive-scale reconstruction through the real `spade` CLI: `--shard R/N` processes together write
exactly what one process writes (byte for byte: h5py writes no timestamps, and each output depends
only on its own file), a killed run redone with `--skip-existing` redoes only the missing outputs,
and an output made by another checkpoint, other settings or from a changed input is redone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from typer.testing import CliRunner

from cli.main import app
from spade_deploy.archive import Shard, assign, parse_shard
from spade_deploy.checkpoint import save_model
from spade_deploy.errors import SpadeError
from spade_deploy.models import build_model
from spade_deploy.paths import sha256_file

SPADE = str(Path(sys.executable).parent / "spade")


@pytest.fixture(scope="module")
def archive(tiny_dataset, tmp_path_factory):
    """Four simulated files of 2, 2, 1 and 2 slices in one folder, and two tiny DEQs (other weights)."""
    root = tmp_path_factory.mktemp("archive")
    data = root / "data"
    data.mkdir()
    for split in ("train", "val", "test"):
        for f in sorted((tiny_dataset.root / split).glob("*.h5")):
            shutil.copy2(f, data / f.name)
    ckpts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        ckpts.append(save_model(root / f"deq-{seed}.safetensors", build_model("deq", preset="tiny")))
    return data, ckpts


@pytest.fixture(scope="module")
def reference(archive, tmp_path_factory):
    """One process's outputs of the archive with the first checkpoint."""
    data, (ckpt, _) = archive
    root = tmp_path_factory.mktemp("reference")
    _run(_args(ckpt, data, root / "out"), _env(root, "one"))
    return root / "out"


def _env(tmp_path: Path, name: str, **extra) -> dict[str, str]:
    cache = tmp_path / f"cache-{name}"  # each run estimates its own coil maps
    cache.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cache), "COLUMNS": "200", **extra}
    for key in ("SPADE_KILL_AT", "RANK", "WORLD_SIZE"):
        if key not in extra:
            env.pop(key, None)
    return env


def _args(ckpt: Path, data: Path, out: Path, *more: str) -> list[str]:
    return [SPADE, "reconstruct", str(ckpt), str(data), "-o", str(out), "--backend", "torch", "--batch-size", "1",
            *more]


def _run(args, env) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    return proc.stdout


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_shard_split_is_balanced_deterministic_and_complete():
    weights = [2, 2, 1, 2, 16, 1]
    for n in (1, 2, 3, 7):
        parts = assign(weights, n)
        assert sorted(i for p in parts for i in p) == list(range(len(weights)))  # each input exactly once
        assert parts == assign(list(weights), n)
    loads = [sum(weights[i] for i in p) for p in assign(weights, 2)]
    assert loads == [16, 8]  # the 16-slice file alone on one shard, the rest on the other
    assert parse_shard(None, {"RANK": "1", "WORLD_SIZE": "3"}) == Shard(1, 3)
    assert parse_shard(None, {}) == Shard(0, 1)
    assert parse_shard("2/4", {"RANK": "0", "WORLD_SIZE": "2"}) == Shard(2, 4)  # the option wins
    for bad in ("2/2", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(SpadeError, match="not R/N"):
            parse_shard(bad)


@pytest.mark.parametrize("shard", ["2/2", "x", "0/0"])
def test_bad_shard_is_one_error_line(archive, tmp_path, shard):
    data, (ckpt, _) = archive
    result = CliRunner().invoke(app, ["reconstruct", str(ckpt), str(data), "-o", str(tmp_path / "o"), "--shard", shard])
    assert result.exit_code == 1 and result.stderr.startswith("error:") and "R/N" in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_two_shards_write_what_one_process_writes(archive, reference, tmp_path):
    """`--shard 0/2` and torchrun's RANK=1 WORLD_SIZE=2, run at once into one folder, write the same
    bytes as one process; every output records the checkpoint that made it."""
    data, (ckpt, _) = archive
    one, two = reference, tmp_path / "two"
    procs = [subprocess.Popen(_args(ckpt, data, two, "--shard", "0/2"), env=_env(tmp_path, "r0"), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT),
             subprocess.Popen(_args(ckpt, data, two), env=_env(tmp_path, "r1", RANK="1", WORLD_SIZE="2"), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "shard 0/2: 2 of the 4 inputs" in outs[0] and "shard 1/2: 2 of the 4 inputs" in outs[1], outs
    reference = _files(one)
    assert len(reference) == 4 and _files(two) == reference
    digest = sha256_file(ckpt)
    for path in one.iterdir():
        with h5py.File(path, "r") as f:
            assert f.attrs["checkpoint_sha256"] == digest


def test_killed_run_redoes_only_missing_outputs_and_other_checkpoints_redo_all(archive, reference, tmp_path):
    data, (ckpt, other) = archive
    ref, out = reference, tmp_path / "out"
    env = _env(tmp_path, "k")
    # the run kills itself right after its second output (a test hook: the same place on any machine)
    proc = subprocess.run(_args(ckpt, data, out), env={**env, "SPADE_KILL_AT": "output:2"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    first = _stamps(out)
    assert len(first) == 2  # two outputs, no temporary left
    stdout = _run(_args(ckpt, data, out, "--skip-existing"), env)
    assert "2 up to date" in stdout, stdout
    after = _stamps(out)
    assert {k: after[k] for k in first} == first  # the finished outputs were not rewritten
    assert _files(out) == _files(ref)
    # another checkpoint: every output redone, each recording the new checkpoint
    stdout = _run(_args(other, data, out, "--skip-existing"), env)
    assert "up to date" not in stdout, stdout
    redone = _stamps(out)
    assert all(redone[k] != after[k] for k in after)
    for path in out.iterdir():
        with h5py.File(path, "r") as f:
            assert f.attrs["checkpoint_sha256"] == sha256_file(other)
    # an input changed since (its modification time) and other settings: redone too
    changed = sorted(data.iterdir())[1]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    stdout = _run(_args(other, data, out, "--skip-existing"), env)
    assert "3 up to date" in stdout, stdout
    now = _stamps(out)
    assert [k for k in now if now[k] != redone[k]] == [changed.name]
    stdout = _run(_args(other, data, out, "--skip-existing", "-a", "4"), env)
    assert "up to date" not in stdout, stdout


def test_super_resolution_shards_and_skips_alike(tmp_path):
    """`spade reconstruct` of SR images shares the options: shards split by pixels write what one
    run writes, --skip-existing skips PNGs recording the same checkpoint and degradation, and
    another kernel redoes them."""
    import numpy as np
    from PIL import Image

    from spade_deploy.archive import RECORD_KEY
    from spade_deploy.models import get_entry
    from spade_deploy.sr.reconstruct import restore_checkpoint

    rng = np.random.default_rng(0)
    lr = tmp_path / "lr"
    lr.mkdir()
    for i, size in enumerate([(24, 24), (32, 40), (24, 32)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(lr / f"im{i}.png")
    ckpt = get_entry("usrnet").bundled_path("small")
    one, two = tmp_path / "one", tmp_path / "two"
    res = restore_checkpoint(ckpt, lr, one, 2, "k1", backend="torch")
    assert len(res.outputs) == 3
    parts = [restore_checkpoint(ckpt, lr, two, 2, "k1", backend="torch", shard=Shard(r, 2)) for r in (0, 1)]
    assert [len(p.outputs) for p in parts] == [1, 2]  # the 32 x 40 image alone, the two smaller together
    assert _files(two) == _files(one)
    with Image.open(one / "im0.png") as img:
        assert sha256_file(ckpt) in img.text[RECORD_KEY]
    stamps = _stamps(two)
    again = restore_checkpoint(ckpt, lr, two, 2, "k1", backend="torch", skip_existing=True)
    assert len(again.skipped) == 3 and _stamps(two) == stamps
    other = restore_checkpoint(ckpt, lr, two, 2, "k2", backend="torch", skip_existing=True)
    assert not other.skipped and all(_stamps(two)[k] != stamps[k] for k in stamps)
