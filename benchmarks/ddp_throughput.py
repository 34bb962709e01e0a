"""Fine-tuning throughput with 1 and 2 processes (torchrun, gloo on CPU), as a ratio.

    python benchmarks/ddp_throughput.py [--repeats 3] [--size 96] [--slices 16] [--batch-size 4] [--steps 4]
                                        [--out benchmarks/results]

Each measurement is a fresh ``torchrun --standalone --nproc_per_node N`` of this script (``--child``),
which fine-tunes (supervised, :func:`spade_deploy.finetune.finetune_model`, the path of
``spade finetune``) the shipped small DEQ pruned at 0.4 on ``--slices`` simulated ``--size`` x
``--size`` slices of 8 coils, at one global batch of ``--batch-size`` slices whatever N, for
``--steps`` steps; rank 0 times the steps after the first (the first pays for first-touch
allocations) from its progress callback. Three settings, alternating ``--repeats`` times so drift
hits all alike: 1 process with 1 thread, 2 processes with 1 thread each (the same two cores as the
next), 1 process with 2 threads (torch's own intra-op threads, for comparison). Reported: the
median over the repeats of the slices per second, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    import torch

    from spade_deploy.finetune import finetune_model
    from spade_deploy.mri.deq import DEQTrainOptions
    from spade_deploy.train import TrainConfig

    torch.set_num_threads(args.threads)
    stamps: list[float] = []
    cfg = TrainConfig(epochs=1, lr=1e-5, batch_size=args.batch_size, max_steps_per_epoch=args.steps, validate=False,
                      model_options=DEQTrainOptions(lipschitz_weight=0.0))
    finetune_model(args.checkpoint, "supervised", args.data, args.folder, cfg, checkpoint_seconds=None,
                   on_step=lambda label, step, n, loss: stamps.append(time.perf_counter()))
    if int(os.environ.get("RANK", "0")) == 0:
        timed = len(stamps) - 1
        Path(args.result).write_text(json.dumps({"slices_per_s": timed * args.batch_size / (stamps[-1] - stamps[0]),
                                                 "steps": len(stamps)}))


def prepare(work: Path, size: int, slices: int) -> tuple[Path, Path]:
    import shutil

    from spade_deploy.models import bundled_path
    from spade_deploy.mri import simulate
    from spade_deploy.prune import prune_checkpoint

    data = work / "data"
    cfg = simulate.SimConfig(train_volumes=2, train_slices=slices // 2, val_volumes=1, val_slices=1, test_volumes=1,
                             test_slices=1, size=size, n_coils=8)
    simulate.build_default_dataset(data, seed=0, config=cfg)
    shutil.rmtree(data / "val")  # training steps only
    (pruned, _), = prune_checkpoint(bundled_path("deq", "small"), [0.4], work / "pruned")
    return data, pruned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--slices", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="write ddp-throughput-cpu.{md,json} here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    for name in ("--checkpoint", "--data", "--folder", "--result"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    settings = {"1 process x 1 thread": (1, 1), "2 processes x 1 thread": (2, 1), "1 process x 2 threads": (1, 2)}
    got: dict[str, list[float]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data, pruned = prepare(work, args.size, args.slices)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(work / "cache")}
        for r in range(args.repeats):
            for name, (procs, threads) in settings.items():
                run, result = work / f"run-{r}-{procs}-{threads}", work / f"result-{r}-{procs}-{threads}.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                       __file__, "--child", "--threads", str(threads), "--checkpoint", str(pruned), "--data", str(data),
                       "--folder", str(run), "--result", str(result), "--batch-size", str(args.batch_size),
                       "--steps", str(args.steps)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
                got[name].append(json.loads(result.read_text())["slices_per_s"])
                print(f"repeat {r + 1}: {name}: {got[name][-1]:.3f} slices/s", flush=True)
    median = {name: statistics.median(v) for name, v in got.items()}
    base = median["1 process x 1 thread"]
    command = ("python benchmarks/ddp_throughput.py" + (f" --repeats {args.repeats}" if args.repeats != 3 else "")
               + "".join(f" --{k.replace('_', '-')} {getattr(args, k)}"
                         for k, d in (("size", 96), ("slices", 16), ("batch_size", 4), ("steps", 4))
                         if getattr(args, k) != d) + (f" --out {args.out}" if args.out else ""))
    record = {"command": command, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
              "load_average_at_end": os.getloadavg(), "settings": {k: list(v) for k, v in settings.items()},
              "slices_per_s": got, "median_slices_per_s": median,
              "ratio_to_1_process_1_thread": {k: v / base for k, v in median.items()},
              "workload": {"model": "shipped small DEQ pruned at 0.4", "strategy": "supervised", "size": args.size,
                           "coils": 8, "global_batch": args.batch_size, "timed_steps": args.steps - 1}}
    text = render(record)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ddp-throughput-cpu.json").write_text(json.dumps(record, indent=1) + "\n")
        (args.out / "ddp-throughput-cpu.md").write_text(text)


def render(record: dict) -> str:
    """The result as the Markdown table of ddp-throughput-cpu.md."""
    w, median = record["workload"], record["median_slices_per_s"]
    repeats = len(next(iter(record["slices_per_s"].values())))
    base, load, cpus = median["1 process x 1 thread"], record["load_average_at_end"][0], os.cpu_count() or 1
    lines = [f"Fine-tuning throughput ({w['strategy']}, {w['model']}, {w['size']}x{w['size']} slices of {w['coils']} "
             f"coils, global batch {w['global_batch']}, {w['timed_steps']} timed steps), median of {repeats} "
             f"alternating repeats. Machine: {record['machine']}; load average at the end {load:.1f}. "
             f"Command: `{record['command']}`.", ""]
    if load > cpus:
        lines += [f"The machine was shared while this ran (load average {load:.1f} on {cpus} CPUs): each process got "
                  "less than a core, so these figures are what that load allowed, not the machine's; OpenMP's "
                  "threads, which wait for one another at every operation, suffer most from it.", ""]
    lines += ["| setting | slices / s | ratio to 1 process x 1 thread |", "|---|---|---|"]
    lines += [f"| {k} | {median[k]:.3f} | {median[k] / base:.2f} |" for k in median]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
