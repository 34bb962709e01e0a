"""``spade prune --target-speedup X`` on a checkpoint, then the prior speed-up it reached, re-measured.

    python benchmarks/target_speedup.py [--checkpoint spade_deploy/weights/deq-small.safetensors]
        [--target 2] [--round-to auto] [--size 160] [--repeats 20] [--device cpu]

The search (spade_deploy.prune.search_speedup) times the unpruned and each candidate prior in one
interleaved run per step (medians of 5); this script then times the unpruned and the chosen pruned
prior again, independently, with ``--repeats`` interleaved rounds, and prints both figures and
whether the re-measured one lies within 10 % of the target (what issue 12 asks of the search).
Run it on an otherwise idle machine: prior latencies are a few milliseconds.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import torch

from spade_deploy.checkpoint import load_model
from spade_deploy.hwaware import DeviceTimer
from spade_deploy.prune import prune_to_speedup

HERE = Path(__file__).resolve().parent


def main() -> None:
    from spade_deploy.hostmem import keep_freed_memory

    keep_freed_memory()  # as the spade command runs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=HERE.parent / "spade_deploy" / "weights" / "deq-small.safetensors")
    ap.add_argument("--target", type=float, default=2.0)
    ap.add_argument("--round-to", default=None, help="auto | N (default: the paper's exact widths)")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="keep the pruned checkpoint in this folder")
    args = ap.parse_args()
    size = (args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        path, report = prune_to_speedup(args.checkpoint, args.target, out, args.round_to,
                                        timer=DeviceTimer(args.device), size=size)
        unpruned, _ = load_model(args.checkpoint)
        pruned, _ = load_model(path)
        sec = DeviceTimer(args.device, repeats=args.repeats, warmup=2).prior_seconds(
            {"unpruned": unpruned, "pruned": pruned}, size)
    s = report.speedup
    check = sec["unpruned"] / sec["pruned"]
    print(f"{args.checkpoint.name}, target x{args.target:g}, widths {report.widths}, prior on 1 x 2 x {args.size} x "
          f"{args.size}; {args.device} ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads")
    print("| ratio | params | MACs (64x64) | search: speed-up (ms) | re-measured: speed-up (ms), median of "
          f"{args.repeats} | within 10 % |")
    print("|---|---|---|---|---|---|")
    print(f"| {s.ratio:.3f} | {report.params_before:,} -> {report.params_after:,} | "
          f"{report.macs_before / 1e6:.1f} M -> {report.macs_after / 1e6:.1f} M | x{s.speedup:.2f} "
          f"({s.unpruned_ms:.2f} -> {s.pruned_ms:.2f}) | x{check:.2f} ({1000 * sec['unpruned']:.2f} -> "
          f"{1000 * sec['pruned']:.2f}) | {'yes' if abs(check / args.target - 1) <= 0.1 else 'no'} |")
    print("steps (ratio, measured speed-up): " + ", ".join(f"({r:.3f}, x{v:.2f})" for r, v in s.tried))


if __name__ == "__main__":
    main()
