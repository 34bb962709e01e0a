"""Kill -9 `spade train` and `spade finetune` at chosen points, then `--resume`: every file of the run
folder loads after each kill, no temporary file is left at the end, and the final checkpoints and
the history of its epochs are identical to an uninterrupted run's.

The kills are deterministic: the run kills itself (``$SPADE_KILL_AT``, a test hook of
``spade_deploy.train``) at a named step, epoch end, or inside a write of last.safetensors (its
temporary file written, not yet renamed), so they land at the same place on any machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from spade_deploy.io import load_checkpoint
from spade_deploy.prune import prune_checkpoint
from spade_deploy.train import KILL_ENV

from cli.main import app

SPADE = str(Path(sys.executable).parent / "spade")


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of the test's `spade` runs, built when the test runs: one thread (the
    uninterrupted and the killed runs compute alike), and home, cache home (the coil maps) and temp
    folder inside the test's own folder."""
    dirs = {name: tmp_path / f"env-{name.lower()}" for name in ("HOME", "XDG_CACHE_HOME", "TMPDIR")}
    for d in dirs.values():
        d.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200",
           **{name: str(d) for name, d in dirs.items()}}
    env.pop(KILL_ENV, None)
    return env


def _run(args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([SPADE, *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def _kill_at(point: str, args: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run([SPADE, *args], env={**env, KILL_ENV: point}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, f"not killed at {point}:\n" + proc.stdout + proc.stderr


@contextlib.contextmanager
def _alongside(args: list[str], env: dict[str, str], log: Path):
    """Run ``spade args`` in the background while the block runs (the uninterrupted run beside the
    killed ones: the other core); it must have succeeded when the block ends."""
    with log.open("w") as out:
        proc = subprocess.Popen([SPADE, *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield
        assert proc.wait(timeout=600) == 0 and "Traceback" not in log.read_text(), log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _position(path: Path) -> str:
    """Where the run was when ``path`` (a last.safetensors) was written, named as $SPADE_KILL_AT names it."""
    ts = load_checkpoint(path)[1]["train_state"]
    if "pretrain" in ts:
        return f"pretrain:{ts['pretrain']['step']}"
    if ts["step"]:
        return f"epoch:{ts['epoch'] + 1}:step:{ts['step']}"
    return f"epoch:{ts['epoch']}:end" if ts["epoch"] else f"pretrain:{ts['train_config']['pretrain_steps']}"


def _temps(run: Path) -> list[Path]:
    return sorted(run.glob(".*.tmp"))


def _kill_and_resume(args: list[str], run: Path, env: dict[str, str], kills: list[tuple[str, str]]) -> None:
    """Kill the run at each ``(point, position of last.safetensors it leaves)`` in turn, resuming
    each time, then let it finish."""
    for i, (point, left) in enumerate(kills):
        _kill_at(point, [*args, "-o", str(run), *(["--resume"] if i else [])], env)
        for path in run.glob("*.safetensors"):
            load_checkpoint(path)  # raises on a torn or foreign file
        assert _position(run / "last.safetensors") == left, point
        temps = _temps(run)
        if point.startswith("mid-save:"):  # the new last.safetensors written in full, never renamed
            assert len(temps) == 1 and temps[0].name.startswith(".last.safetensors."), temps
            assert _position(temps[0]) == point.removeprefix("mid-save:")
        else:
            assert temps == [], temps
    _run([*args, "-o", str(run), "--resume"], env)
    assert _temps(run) == []


def _assert_same_run(a: Path, b: Path) -> None:
    for name in ("best.safetensors", "last.safetensors"):
        (sa, ma), (sb, mb) = load_checkpoint(a / name), load_checkpoint(b / name)
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{name}: {key} differs from the uninterrupted run"
        for key in ("epoch", "history", "train_state"):  # the losses and scores of every epoch
            assert ma.get(key) == mb.get(key), f"{name}: its {key} differs from the uninterrupted run"
    histories = [json.loads((run / "history.json").read_text()) if (run / "history.json").exists() else None
                 for run in (a, b)]
    assert histories[0] == histories[1]


def test_kill_9_then_resume_ends_identical(tiny_dataset, tmp_path, env):
    data = ["--data", str(tiny_dataset.root)]
    # 12 pretraining steps, then 2 epochs of 4 steps (4 training slices, batch 1); a checkpoint
    # after every step.
    train = ["train", "--preset", "tiny", *data, "--epochs", "2", "--batch-size", "1", "--pretrain-steps", "12",
             "--train-max-iter", "10", "--lr", "1e-3", "--checkpoint-seconds", "0"]
    with _alongside([*train, "-o", str(tmp_path / "train-straight")], env, tmp_path / "train-straight.log"):
        _kill_and_resume(train, tmp_path / "train-killed", env, [
            ("pretrain:7", "pretrain:7"),
            ("epoch:1:step:2", "epoch:1:step:2"),
            ("mid-save:epoch:1:end", "epoch:1:step:3"),  # best.safetensors of epoch 1 written, last not
        ])
    _assert_same_run(tmp_path / "train-straight", tmp_path / "train-killed")

    (pruned, _), = prune_checkpoint(tmp_path / "train-straight" / "best.safetensors", [0.4], tmp_path / "pruned")
    finetune = ["finetune", str(pruned), "-s", "self-supervised", *data, "--epochs", "3", "--batch-size", "1",
                "--lr", "1e-3", "--checkpoint-seconds", "0"]
    # 3 epochs of 2 steps (the 2 test slices)
    with _alongside([*finetune, "-o", str(tmp_path / "ft-straight")], env, tmp_path / "ft-straight.log"):
        _kill_and_resume(finetune, tmp_path / "ft-killed", env, [
            ("mid-save:epoch:2:step:1", "epoch:1:end"),
            ("epoch:3:end", "epoch:3:end"),  # after the last epoch's checkpoints
        ])
    _assert_same_run(tmp_path / "ft-straight", tmp_path / "ft-killed")


def test_a_malformed_kill_point_is_one_error_line(tiny_dataset, tmp_path):
    result = CliRunner().invoke(app, ["train", "--preset", "tiny", "--data", str(tiny_dataset.root), "--epochs", "1",
                                      "-o", str(tmp_path / "run")], env={KILL_ENV: "epoch:0:end"})
    out = result.stderr.strip()
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert out.startswith(f"error: ${KILL_ENV} is 'epoch:0:end'") and len(out.splitlines()) == 1, out
    assert not (tmp_path / "run").exists()


def test_resume_removes_stale_temp_files(tiny_dataset, tmp_path, env):
    """Temp files a kill left beside the run's files are removed when the run starts or resumes,
    the nested ones too (a kill inside the checkpoint writer's own write into the mid-save hook's
    temporary file); files of other names are left alone; --resume with nothing to resume starts afresh."""
    run = tmp_path / "run"
    run.mkdir()
    leftovers = [".last.safetensors.abc123.tmp", ".best.safetensors.x.tmp", ".history.json.y.tmp",
                 "..last.safetensors.abc123.tmp.k_9x.tmp"]
    for name in leftovers:
        (run / name).write_bytes(b"x" * 1000)
    (run / "notes.tmp").write_text("mine")
    _run(["train", "--preset", "tiny", "--data", str(tiny_dataset.root), "--epochs", "1", "--batch-size", "4",
          "--pretrain-steps", "0", "--train-max-iter", "5", "-o", str(run), "--resume"], env)
    assert not [name for name in leftovers if (run / name).exists()]
    assert (run / "notes.tmp").read_text() == "mine"
    _, manifest = load_checkpoint(run / "last.safetensors")
    assert manifest["train_state"]["epoch"] == 1


def test_a_killed_school_run_leaves_no_teacher_folder_after_resume(tiny_dataset, tmp_path, env):
    """The school loss keeps the teacher's reconstructions in a temporary folder that the process
    removes when it ends; kill -9 leaves it in the temp folder, and the next run (--resume)
    removes it, so nothing of either process is left there once the run has finished."""
    from spade_deploy.checkpoint import save_model
    from spade_deploy.models import build_model

    torch.manual_seed(0)
    teacher = save_model(tmp_path / "deq.safetensors", build_model("deq", preset="tiny"))
    (pruned, _), = prune_checkpoint(teacher, [0.4], tmp_path / "pruned")
    run, tmp = tmp_path / "run", Path(env["TMPDIR"])
    args = ["finetune", str(pruned), "-s", "school", "--teacher", str(teacher), "--data", str(tiny_dataset.root),
            "--epochs", "2", "--batch-size", "1", "--checkpoint-seconds", "0", "--lipschitz-weight", "0", "-o", str(run)]
    _kill_at("epoch:1:step:1", args, env)
    left, = tmp.glob("spade-teacher-*")  # the killed process's, with the reconstruction of step 1
    assert len(list(left.glob("*.safetensors"))) == 1
    _run([*args, "--resume"], env)
    assert list(tmp.iterdir()) == []
    assert _temps(run) == [] and (run / "best.safetensors").is_file()
