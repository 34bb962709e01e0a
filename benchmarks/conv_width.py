"""How fast 3x3 convolutions run at the widths pruning leaves: time per call and GMAC/s, on
PyTorch (channels-last, oneDNN) and onnxruntime, for a chain of ``--depth`` c -> c convolutions with
ReLU (the body of the EDSR prior) on a 160 x 160 image.

    python benchmarks/conv_width.py [--widths 64 48 40 38 32] [--depth 8] [--repeats 20]

A pruned prior is only as much faster as its MACs if its kernels run its widths as efficiently as
the unpruned ones; this prints how far each back-end falls short (``efficiency`` is GMAC/s relative
to the widest chain on the same back-end). A chain, not one layer, so that onnxruntime's layout
changes at the graph's ends (NCHWc) weigh as little as in a prior. Calls are interleaved across
widths; medians (spade_deploy.timing.interleaved_medians, what ``spade prune --round-to auto``
times with).

    python benchmarks/conv_width.py --prior CHECKPOINT [--ratio 0.4] [--size 160]

prints instead what ``--round-to auto`` measures for that model on this device: per group of
channels pruned together, the time of the group's own convolutions at each width near the
paper-exact count, their time per MMAC, and the width chosen.

    python benchmarks/conv_width.py --grid --widths 16 19 26 32 --out-widths 3 8 16 19 26 32

prints the time of one 3x3 convolution c_in -> c_out in PyTorch (channels-last) for every pair:
how the cost grows with the input and with the output channels separately (oneDNN computes the
output channels in blocks of the vector width, so a block only partly filled costs a whole one).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from spade_deploy.deploy.priors import onnx_session
from spade_deploy.hwaware import DeviceTimer
from spade_deploy.timing import interleaved_medians


def main() -> None:
    from spade_deploy.hostmem import keep_freed_memory

    keep_freed_memory()  # as the spade command runs
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 48, 40, 38, 32])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--prior", type=Path, default=None, help="a checkpoint: show what --round-to auto measures for it")
    ap.add_argument("--ratio", type=float, default=0.4)
    ap.add_argument("--grid", action="store_true", help="one convolution per (input width, output width) pair")
    ap.add_argument("--out-widths", type=int, nargs="+", default=[3, 8, 16, 19, 26, 32])
    args = ap.parse_args()
    if args.prior is not None:
        return show_auto_widths(args)
    if args.grid:
        return show_grid(args)
    torch.manual_seed(0)
    s, depth = args.size, args.depth
    warnings.simplefilter("ignore", DeprecationWarning)
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in args.widths:
            conv = nn.Sequential(*[m for _ in range(depth) for m in (nn.Conv2d(c, c, 3, padding=1), nn.ReLU())]).eval()
            x = torch.randn(1, c, s, s)
            path = Path(tmp) / f"conv{c}.onnx"
            torch.onnx.export(conv, (x,), str(path), input_names=["x"], output_names=["y"], opset_version=17, dynamo=False)
            session, xn = onnx_session(path), x.numpy()
            xc = x.contiguous(memory_format=torch.channels_last)
            runners[c] = {"torch": lambda conv=conv, xc=xc: conv(xc),
                          "onnxruntime": lambda session=session, xn=xn: session.run(None, {"x": xn})}
        calls = {(c, b): fn for c, fns in runners.items() for b, fn in fns.items()}
        medians = interleaved_medians(calls, repeats=args.repeats, warmup=2)
    print(f"{depth} x (3x3 convolution c -> c, ReLU) on 1 x c x {s} x {s}; CPU {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print("| width | GMACs | back-end | ms | GMAC/s | efficiency vs width " + str(max(args.widths)) + " |")
    print("|---|---|---|---|---|---|")
    widest = max(args.widths)
    for b in ("torch", "onnxruntime"):
        macs = {c: depth * 9 * c * c * s * s for c in runners}
        rate = {c: macs[c] / medians[(c, b)] / 1e9 for c in runners}
        for c in runners:
            print(f"| {c} | {macs[c] / 1e9:.2f} | {b} | {1000 * medians[(c, b)]:.2f} | "
                  f"{rate[c]:.0f} | {rate[c] / rate[widest]:.2f} |")


def show_grid(args) -> None:
    torch.manual_seed(0)
    s = args.size
    calls = {}
    for ci in args.widths:
        x = torch.randn(1, ci, s, s).contiguous(memory_format=torch.channels_last)
        for co in args.out_widths:
            conv = nn.Conv2d(ci, co, 3, padding=1).eval().to(memory_format=torch.channels_last)
            calls[(ci, co)] = lambda conv=conv, x=x: conv(x)
    with torch.no_grad():
        medians = interleaved_medians(calls, repeats=args.repeats, warmup=2, rotate=True)
    print(f"one 3x3 convolution c_in -> c_out on 1 x c_in x {s} x {s}, PyTorch channels-last; CPU "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; ms, median of {args.repeats}")
    print("| c_in \\ c_out | " + " | ".join(map(str, args.out_widths)) + " |")
    print("|---" * (len(args.out_widths) + 1) + "|")
    for ci in args.widths:
        print(f"| {ci} | " + " | ".join(f"{1000 * medians[(ci, co)]:.2f}" for co in args.out_widths) + " |")


def show_auto_widths(args) -> None:
    from spade_deploy.checkpoint import load_model
    from spade_deploy.prune import prune_model

    model, _ = load_model(args.prior)
    timer = DeviceTimer("cuda" if torch.cuda.is_available() else "cpu", repeats=args.repeats)
    _, report = prune_model(model, args.ratio, "auto", timer=timer, measure_size=(args.size, args.size))
    print(f"{args.prior.name} at ratio {args.ratio:g}, convolutions timed on {timer.device} at {args.size} x {args.size}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print("| prior | group (first layer) | channels | paper | width | ms | ms per MMAC | chosen |")
    print("|---|---|---|---|---|---|---|---|")
    for p in report.priors:
        for g in p.groups:
            for w in sorted(g.ms):
                print(f"| {p.name} | {g.layers[0]} | {g.channels} | {g.paper} | {w} | {g.ms[w]:.3f} | "
                      f"{g.ms[w] / g.mmacs[w]:.4f} | {'<-' if w == g.chosen else ''} |")


if __name__ == "__main__":
    main()
