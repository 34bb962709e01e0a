"""glibc's defaults against :func:`spade_deploy.hostmem.keep_freed_memory`, on the small DEQ.

    python benchmarks/host_allocator.py [--pairs 4] [--calls 20] [--out benchmarks/results]

The setting holds for a whole process, so each measurement is a fresh process (this script with
``--child``), the two settings alternating ``--pairs`` times so drift hits both alike. Each
process times, interleaved, ``--calls`` calls of: the shipped small DEQ's prior and its pruned
copies (0.2, 0.4 and 0.4 at hardware-aware width 16, paper-exact widths otherwise) on one
160 x 160 input in channels-last, the data-consistency part of one outer iteration (the
gradient step ``x - gamma A^H(Ax - y)``, 8 coils), and one whole reconstruction of a
synthetic 160 x 160 slice by the unpruned model. Reported: the median over the processes of
each process's median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path


def child(calls: int) -> dict:
    import torch

    from spade_deploy.checkpoint import load_model
    from spade_deploy.deploy.priors import ChannelsLastPrior
    from spade_deploy.mri.physics import synthetic_sample
    from spade_deploy.hostmem import keep_freed_memory
    from spade_deploy.mri.physics import complex_to_channels
    from spade_deploy.prune import prune_model
    from spade_deploy.timing import interleaved_medians
    from spade_deploy.models import bundled_path

    state = keep_freed_memory()
    base, _ = load_model(bundled_path("deq", "small"))
    base.eval()
    priors = {"prior 0%": base.prior, "prior 20%": prune_model(base, 0.2)[0].prior,
              "prior 40%": prune_model(base, 0.4)[0].prior, "prior 40% width 16": prune_model(base, 0.4, 16)[0].prior}
    x = torch.randn(1, 2, 160, 160)
    y, physics = synthetic_sample(160, 160, coils=8)
    y_n, x0, _ = base._normalise(y, physics)
    xc = x0.clone()
    fns = {name: (lambda p=ChannelsLastPrior(p): p(x)) for name, p in priors.items()}
    fns["data consistency"] = lambda: complex_to_channels(xc - base.gamma * physics.grad(xc, y_n))
    fns["reconstruction 0%"] = lambda: base(y, physics)
    with torch.no_grad():
        sec = interleaved_medians(fns, repeats=calls, warmup=1, rotate=True)
    return {"allocator": state, "ms": {name: 1000 * t for name, t in sec.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=4, help="processes per setting, alternating")
    ap.add_argument("--calls", type=int, default=20, help="interleaved calls per process")
    ap.add_argument("--out", type=Path, default=None, help="also write host-allocator-cpu.md here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.calls)))
        return
    runs: dict[str, list[dict]] = {"system": [], "kept": []}
    for i in range(args.pairs):
        for setting in ("system", "kept"):
            env = {**os.environ, "SPADE_HOST_ALLOCATOR": setting}
            out = subprocess.run([sys.executable, __file__, "--child", "--calls", str(args.calls)], env=env,
                                 check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            runs[setting].append(res["ms"])
            print(f"process {i + 1}/{args.pairs} {setting} (applied: {res['allocator']})", file=sys.stderr, flush=True)
    names = list(runs["system"][0])
    med = {s: {n: statistics.median(r[n] for r in runs[s]) for n in names} for s in runs}
    spread = {s: {n: (min(r[n] for r in runs[s]), max(r[n] for r in runs[s])) for n in names} for s in runs}
    import torch

    lines = [f"`python benchmarks/host_allocator.py --pairs {args.pairs} --calls {args.calls}` "
             f"({platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}): "
             f"median over {args.pairs} processes per setting of each process's median of {args.calls} "
             "interleaved calls (range over processes in brackets).", "",
             "| what | glibc defaults (ms) | freed memory kept (ms) | ratio |", "|---|---|---|---|"]
    for n in names:
        a, b = med["system"][n], med["kept"][n]
        lo_a, hi_a = spread["system"][n]
        lo_b, hi_b = spread["kept"][n]
        lines.append(f"| {n} | {a:.2f} ({lo_a:.2f}-{hi_a:.2f}) | {b:.2f} ({lo_b:.2f}-{hi_b:.2f}) | x{a / b:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        from spade_deploy.io import write_text

        write_text(args.out / "host-allocator-cpu.md", text)


if __name__ == "__main__":
    main()
