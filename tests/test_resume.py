"""Kill -9 at random moments of `spade train` and `spade finetune`, then `--resume`: every file of
the run folder loads after each kill, no temporary file is left at the end, and the final
checkpoints are tensor-identical to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from spade_deploy.io import load_checkpoint
from spade_deploy.prune import prune_checkpoint

SPADE = str(Path(sys.executable).parent / "spade")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}


KILLED_AT: list[str] = []  # what each kill interrupted (read back from last.safetensors)


def _run(args: list[str], timeout: float = 120) -> None:
    proc = subprocess.run([SPADE, *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _run_and_kill(args: list[str], run: Path, rng: random.Random, when: str) -> bool:
    """Start ``spade args`` and ``kill -9`` it: ``early``, at a random moment before it writes
    anything; ``soon``, within 50 ms of its first or second write of last.safetensors (the
    pretraining, when it starts afresh); ``any``, up to 0.3 s after its 1st-3rd write. Returns
    whether it was killed before it finished."""
    last = run / "last.safetensors"
    proc = subprocess.Popen([SPADE, *args], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if when == "early":
            time.sleep(rng.uniform(0.3, 1.5))  # importing / building: nothing written yet
        else:
            writes, seen, deadline = rng.randint(1, 2 if when == "soon" else 3), _mtime(last), time.monotonic() + 120
            while writes and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
                if _mtime(last) != seen:
                    seen, writes = _mtime(last), writes - 1
            time.sleep(rng.uniform(0.0, 0.05 if when == "soon" else 0.3))
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if not killed:
            assert proc.returncode == 0, proc.stderr.read().decode()
        return killed
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _check_loadable(run: Path) -> None:
    for path in run.glob("*.safetensors"):
        load_checkpoint(path)  # raises on a torn or foreign file
    if (run / "history.json").exists():
        json.loads((run / "history.json").read_text())


def _assert_same_tensors(a: Path, b: Path) -> None:
    sa, ma = load_checkpoint(a)
    sb, mb = load_checkpoint(b)
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), f"{a.name}: {key} differs from the uninterrupted run"


def _kill_and_resume(args: list[str], run: Path, rng: random.Random, kills: list[str]) -> int:
    done, n_killed = False, 0
    for i, when in enumerate(kills):
        resume = ["--resume"] if i else []
        if not _run_and_kill([*args, "-o", str(run), *resume], run, rng, when):
            done = True
            break
        n_killed += 1
        _check_loadable(run)
        if (run / "last.safetensors").exists():
            ts = load_checkpoint(run / "last.safetensors")[1]["train_state"]
            KILLED_AT.append("pretraining" if "pretrain" in ts else "mid-epoch" if ts["step"] else "epoch end")
    if not done:
        _run([*args, "-o", str(run), "--resume"])
    _check_loadable(run)
    leftovers = [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    return n_killed


def test_kill_9_then_resume_ends_identical(tiny_dataset, tmp_path):
    rng = random.Random(20261130)
    data = ["--data", str(tiny_dataset.root)]
    train = ["train", "--preset", "tiny", *data, "--epochs", "2", "--batch-size", "1", "--pretrain-steps", "12",
             "--train-max-iter", "10", "--lr", "1e-3", "--checkpoint-seconds", "0"]
    _run([*train, "-o", str(tmp_path / "train-straight")])
    killed = _kill_and_resume(train, tmp_path / "train-killed", rng, ["early", "soon", "any"])
    for name in ("best.safetensors", "last.safetensors"):
        _assert_same_tensors(tmp_path / "train-straight" / name, tmp_path / "train-killed" / name)

    (pruned, _), = prune_checkpoint(tmp_path / "train-straight" / "best.safetensors", [0.4], tmp_path / "pruned")
    finetune = ["finetune", str(pruned), "-s", "self-supervised", *data, "--epochs", "4", "--batch-size", "1",
                "--lr", "1e-3", "--checkpoint-seconds", "0"]
    _run([*finetune, "-o", str(tmp_path / "ft-straight")])
    killed += _kill_and_resume(finetune, tmp_path / "ft-killed", rng, ["any", "any", "any"])
    for name in ("best.safetensors", "last.safetensors"):
        _assert_same_tensors(tmp_path / "ft-straight" / name, tmp_path / "ft-killed" / name)
    print("kills interrupted:", KILLED_AT)
    assert killed >= 5, f"only {killed} runs were killed before they finished"
    assert "pretraining" in KILLED_AT, KILLED_AT  # a kill in the denoiser pretraining, resumed exactly


def test_resume_removes_stale_temp_files(tiny_dataset, tmp_path):
    """Temp files a kill left beside the run's files are removed when the run starts or resumes;
    files of other names are left alone; --resume with nothing to resume starts afresh."""
    run = tmp_path / "run"
    run.mkdir()
    leftovers = [".last.safetensors.abc123.tmp", ".best.safetensors.x.tmp", ".history.json.y.tmp"]
    for name in leftovers:
        (run / name).write_bytes(b"x" * 1000)
    (run / "notes.tmp").write_text("mine")
    _run(["train", "--preset", "tiny", "--data", str(tiny_dataset.root), "--epochs", "1", "--batch-size", "4",
          "--pretrain-steps", "0", "--train-max-iter", "5", "-o", str(run), "--resume"])
    assert not [name for name in leftovers if (run / name).exists()]
    assert (run / "notes.tmp").read_text() == "mine"
    _, manifest = load_checkpoint(run / "last.safetensors")
    assert manifest["train_state"]["epoch"] == 1
