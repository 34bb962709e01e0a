"""One training job over two processes, as `torchrun --nproc_per_node 2 $(which spade) train|finetune`
starts it (gloo, CPU, one thread each), on data of two image sizes: the weights equal a
one-process run's at the same global batch and are identical on both ranks after every step; a
short last batch leaves a rank nothing to do and nothing hangs; validation is sharded by volume and
scores as one process does; a NaN on one rank stops both with the one-line error; kill -9 and
--resume on two ranks, or on one, end as the uninterrupted run; rank 0 alone writes and talks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spade_deploy.checkpoint import save_model
from spade_deploy.distributed import share
from spade_deploy.io import load_checkpoint
from spade_deploy.models import build_model
from spade_deploy.mri import simulate
from spade_deploy.prune import prune_checkpoint
from spade_deploy.train import CHECK_RANKS_ENV, KILL_ENV, NAN_ENV


SPADE = str(Path(sys.executable).parent / "spade")
# 32x32 images with 4 coils and 40x40 with 2: each split holds one volume of each size
SIZES = (("a", 32, 4, 3), ("b", 40, 2, 2))  # (name, size, coils, slices of the train and test volumes)
# the centre block of a 32-column mask must leave the coil-map estimate 4 columns
SAMPLING = ["--center-fraction", "0.16"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    root = base / "data"
    for name, size, coils, slices in SIZES:
        part = base / f"sim-{name}"
        cfg = simulate.SimConfig(train_volumes=1, train_slices=slices, val_volumes=1, val_slices=2, test_volumes=1,
                                 test_slices=slices, size=size, n_coils=coils)
        simulate.build_default_dataset(part, seed=3, config=cfg)
        for split in ("train", "val", "test"):
            (root / split).mkdir(parents=True, exist_ok=True)
            for f in (part / split).glob("*.h5"):
                shutil.copyfile(f, root / split / f"{name}_{f.name}")
    torch.manual_seed(0)
    deq = save_model(base / "deq.safetensors", build_model("deq", preset="tiny"))
    (pruned, _), = prune_checkpoint(deq, [0.4], base / "pruned")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "200"}
    for name in (KILL_ENV, NAN_ENV, CHECK_RANKS_ENV):
        env.pop(name, None)
    return root, pruned, env


def _torchrun(args: list[str], env: dict, logs: Path, **extra_env) -> tuple[int, list[tuple[str, str]]]:
    """``torchrun --standalone --nproc_per_node 2 spade ARGS``: its exit status and each rank's
    (stdout, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", SPADE, *args]
    proc = subprocess.run(cmd, env={**env, **extra_env}, capture_output=True, text=True, timeout=300)
    ranks = []
    for rank in range(2):
        folder, = logs.glob(f"*/attempt_0/{rank}")
        ranks.append(((folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()))
    return proc.returncode, ranks


def _spade(args: list[str], env: dict) -> str:
    """One process, as a user runs `spade`: the reference runs. A process of its own with the
    ranks' thread settings (one thread): a run in this process would keep the thread count torch
    started with, and a DEQ's training amplifies the other rounding of a second thread through
    its iteration counts."""
    proc = subprocess.run([SPADE, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _assert_same_run(reference: Path, other: Path, world_size: int) -> None:
    """The weights allclose (rtol 1e-5), the losses and validation scores of every epoch equal
    (rel 1e-6), and the manifest records the world size of the run that wrote it."""
    for name in ("best.safetensors", "last.safetensors"):
        (sa, ma), (sb, mb) = load_checkpoint(reference / name), load_checkpoint(other / name)
        assert sorted(sa) == sorted(sb)
        for key in sa:
            assert torch.allclose(sa[key], sb[key], rtol=1e-5, atol=1e-7), f"{name}: {key}"
        assert ma["world_size"] == 1 and mb["world_size"] == world_size
        assert ma["epoch"] == mb["epoch"]
        _assert_same_history((ma.get("train_state") or ma)["history"], (mb.get("train_state") or mb)["history"])


def _assert_same_history(a: list[dict], b: list[dict]) -> None:
    """Each epoch's record alike: losses and validation scores within 1e-6 relative."""
    assert len(a) == len(b) and len(a) > 0
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert rb[k] == (pytest.approx(ra[k], rel=1e-6) if isinstance(ra[k], float) else ra[k]), k


def test_shares_split_every_global_batch():
    """Each rank's share of a global batch: together the batch, in order; a short batch leaves
    the last ranks fewer samples or none."""
    for n in range(0, 6):
        for world in (1, 2, 3):
            shares = [share(list(range(n)), r, world) for r in range(world)]
            assert [i for s in shares for i in s] == list(range(n))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_two_processes_train_as_one_and_stop_together_on_a_nan(setup, tmp_path):
    """VarNet training: 5 training slices (3 of one size, 2 of the other) at --batch-size 2 make
    batches of 2, 1 and 2 slices each epoch (the one-slice batch leaves rank 1 nothing); two
    validation volumes, one per rank. Then a NaN on rank 1 stops both ranks with one error line."""
    root, _, env = setup
    args = ["train", "-m", "varnet", "--preset", "tiny", "--data", str(root), "--epochs", "2", "--batch-size", "2",
            "--lr", "1e-3", "--checkpoint-seconds", "0", *SAMPLING]
    _spade([*args, "-o", str(tmp_path / "one")], env)
    rc, ranks = _torchrun([*args, "-o", str(tmp_path / "two"), "--workers", "1"], env, tmp_path / "logs",
                          **{CHECK_RANKS_ENV: "1"})
    assert rc == 0, ranks
    _assert_same_run(tmp_path / "one", tmp_path / "two", 2)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["best.safetensors", "history.json",
                                                                    "last.safetensors"]
    one, two = (json.loads((tmp_path / run / "history.json").read_text())["history"] for run in ("one", "two"))
    _assert_same_history(one, two)
    assert all("val_psnr" in record for record in two)  # sharded over the ranks, scored as one process
    assert "best checkpoint" in ranks[0][0] and "Traceback" not in ranks[0][1]
    assert ranks[1] == ("", "")  # rank 1 says nothing

    rc, ranks = _torchrun([*args, "-o", str(tmp_path / "nan")], env, tmp_path / "nan-logs",
                          **{NAN_ENV: "rank:1:epoch:1:step:2"})
    assert rc != 0
    for out, err in ranks:
        assert err.strip().splitlines() == ["error: training diverged: the loss is nan at epoch 1, step 2; "
                                            "no epoch was validated (a lower --lr may help)"], err
    state, manifest = load_checkpoint(tmp_path / "nan" / "last.safetensors")  # written after step 1
    assert manifest["train_state"]["step"] == 1 and all(torch.isfinite(t).all() for t in state.values())


def test_kill_9_and_resume_on_two_or_one_ranks_ends_as_one_process(setup, tmp_path):
    """A pruned DEQ fine-tuned self-supervised (equivariant-imaging draws, its convergence penalty
    and training solver: the model's own hooks) with 2 ranks, killed by -9 after step 2 of 3 of
    its first epoch, resumed on 2 ranks and, from a copy, on 1: both end as the one-process run."""
    root, pruned, env = setup
    args = ["finetune", str(pruned), "-s", "self-supervised", "--data", str(root), "--epochs", "2",
            "--batch-size", "2", "--lr", "1e-3", "--checkpoint-seconds", "0", "--lipschitz-target", "0.95", *SAMPLING]
    _spade([*args, "-o", str(tmp_path / "one")], env)
    killed = tmp_path / "killed"
    rc, ranks = _torchrun([*args, "-o", str(killed)], env, tmp_path / "logs-kill",
                          **{KILL_ENV: "epoch:1:step:2", CHECK_RANKS_ENV: "1"})
    assert rc != 0
    assert sorted(p.name for p in killed.iterdir()) == ["last.safetensors"]
    ts = load_checkpoint(killed / "last.safetensors")[1]["train_state"]
    assert (ts["epoch"], ts["step"]) == (0, 2)
    shutil.copytree(killed, tmp_path / "killed-one")
    rc, ranks = _torchrun([*args, "-o", str(killed), "--resume", "--workers", "1"], env, tmp_path / "logs-resume",
                          **{CHECK_RANKS_ENV: "1"})
    assert rc == 0, ranks
    assert ranks[1] == ("", "")
    _assert_same_run(tmp_path / "one", killed, 2)
    _spade([*args, "-o", str(tmp_path / "killed-one"), "--resume"], env)
    _assert_same_run(tmp_path / "one", tmp_path / "killed-one", 1)
    for run in (killed, tmp_path / "killed-one"):
        assert sorted(p.name for p in run.iterdir()) == ["best.safetensors", "last.safetensors"]


def test_school_reconstructions_are_written_once_and_read_back(setup):
    """The school loss runs the teacher once per sample: its reconstructions go to disk (one file
    a sample, under the process's temporary folder) and come back from there, equal, the next time
    the sample is in a batch, whatever the batch's other samples."""
    from spade_deploy.losses import SchoolLoss
    from spade_deploy.mri import reader
    from spade_deploy.mri.task import MRITask

    root, _, _ = setup
    task, ds = MRITask(center_fraction=0.16), reader.SliceDataset(root / "test")
    torch.manual_seed(0)
    teacher = build_model("varnet", preset="tiny").eval()
    calls = []

    def counted(y, physics):
        calls.append(y.shape[0])
        return teacher(y, physics)

    loss = SchoolLoss()
    first = loss.teacher_output(task.eval_batch(task.collate([ds[0], ds[1]])), counted)
    files = sorted(loss._folder.glob("*.safetensors"))
    assert calls == [2] and len(files) == 2
    again = loss.teacher_output(task.eval_batch(task.collate([ds[1], ds[2]])), counted)
    assert calls == [2, 1] and len(sorted(loss._folder.glob("*.safetensors"))) == 3  # only the new sample ran
    assert torch.equal(again[0], first[1])


def test_ranks_share_rank_0s_teacher_folder_and_dead_processes_folders_are_removed(tmp_path, monkeypatch):
    """Under torchrun every rank that sees rank 0's folder of teacher reconstructions uses it (a
    sample moving to another rank is not run again) and drops its own; a folder whose process was
    killed is removed by the next process, one of a live process is left alone."""
    import tempfile
    from types import SimpleNamespace

    from spade_deploy import losses

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    rank0, rank1 = losses.SchoolLoss(), losses.SchoolLoss()
    rank0.share(("teacher", "data"))
    monkeypatch.setattr(losses.SchoolLoss, "_SHARED", {})  # rank 1: another process
    rank1.share(("teacher", "data"))
    own = rank1._folder
    assert own != rank0._folder
    rank1.join(SimpleNamespace(active=True, all_gather=lambda obj: [str(rank0._folder), obj]))
    assert rank1._folder == rank0._folder and not own.exists()
    rank1.share(("teacher", "data"))  # a later run of this process (spade demo) keeps it
    assert rank1._folder == rank0._folder

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    name = f"spade-teacher-{int(dead.stdout)}-{losses._host()}-abc_1234"
    (tmp_path / name).mkdir()
    (tmp_path / name / "x.safetensors").write_bytes(b"x")
    live = tmp_path / f"spade-teacher-{os.getppid()}-{losses._host()}-abc_1234"
    live.mkdir()
    assert losses.remove_dead_teacher_folders() == [tmp_path / name]
    assert live.is_dir() and rank0._folder.is_dir()


def test_the_convergence_penalty_measures_lipschitz_samples_slices_of_each_global_batch(monkeypatch):
    """Each sample is backpropagated alone, on any number of processes; the DEQ's penalty still
    measures ``lipschitz_samples`` slices of each global batch (in turn with the step), not every
    slice: the hook is told the sample's position in the global batch."""
    from spade_deploy.mri.deq import DEQTrainOptions

    model = build_model("deq", preset="tiny")
    monkeypatch.setattr(model, "regularizer", lambda batch, x, target, on, samples=None: torch.tensor(1.0))
    x = torch.zeros(1, 2, 8, 8)
    one, every = DEQTrainOptions(lipschitz_samples=1), DEQTrainOptions(lipschitz_samples=None)
    for step in range(3):
        penalised = [model.training_penalty(None, x, one, step, (pos, 4)) is not None for pos in range(4)]
        assert penalised == [pos == step % 4 for pos in range(4)]
        assert all(model.training_penalty(None, x, every, step, (pos, 4)) is not None for pos in range(4))
    assert model.training_penalty(None, x, DEQTrainOptions(lipschitz_weight=0.0), 0, (0, 4)) is None
