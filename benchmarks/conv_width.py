"""How fast 3x3 convolutions run at the widths pruning leaves: time per call and GMAC/s, on
PyTorch (channels-last, oneDNN) and onnxruntime, for a chain of ``--depth`` c -> c convolutions with
ReLU (the body of the EDSR prior) on a 160 x 160 image.

    python benchmarks/conv_width.py [--widths 64 48 40 38 32] [--depth 8] [--repeats 20]

A pruned prior is only as much faster as its MACs if its kernels run its widths as efficiently as
the unpruned ones; this prints how far each back-end falls short (``efficiency`` is GMAC/s relative
to the widest chain on the same back-end). A chain, not one layer, so that onnxruntime's layout
changes at the graph's ends (NCHWc) weigh as little as in a prior. Calls are interleaved across
widths; medians.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from spade_deploy.export import onnx_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 48, 40, 38, 32])
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
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
        times = {(c, b): [] for c in runners for b in runners[c]}
        with torch.no_grad():
            for r in range(args.repeats + 2):  # two warm-up rounds
                for c, fns in runners.items():
                    for b, fn in fns.items():
                        t0 = time.perf_counter()
                        fn()
                        if r >= 2:
                            times[(c, b)].append(time.perf_counter() - t0)
    print(f"{depth} x (3x3 convolution c -> c, ReLU) on 1 x c x {s} x {s}; CPU {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print("| width | GMACs | back-end | ms | GMAC/s | efficiency vs width " + str(max(args.widths)) + " |")
    print("|---|---|---|---|---|---|")
    widest = max(args.widths)
    for b in ("torch", "onnxruntime"):
        macs = {c: depth * 9 * c * c * s * s for c in runners}
        rate = {c: macs[c] / statistics.median(times[(c, b)]) / 1e9 for c in runners}
        for c in runners:
            print(f"| {c} | {macs[c] / 1e9:.2f} | {b} | {1000 * statistics.median(times[(c, b)]):.2f} | "
                  f"{rate[c]:.0f} | {rate[c] / rate[widest]:.2f} |")


if __name__ == "__main__":
    main()
