"""``spade serve`` end to end: latency per slice of the unpruned and the pruned 0.4 DEQ, and
throughput with two clients at once.

    OMP_NUM_THREADS=1 python benchmarks/serve_latency.py [--work runs/serve-latency] [--rounds 3]
                                                         [--out benchmarks/results]

Models: the small DEQ shipped in the package and, unless ``--pruned`` names one, that model pruned
at 0.4 with the paper's widths (``spade prune -r 0.4``) and fine-tuned by the demo's supervised
recipe (``spade finetune --strategy supervised --epochs 2 --lr 5e-4``), made
once in ``--work`` (the embedded dataset is built there too). Data: the embedded test split (2
volumes x 6 slices, 160 x 160, 8 coils) converted to ISMRMRD raw at acceleration 6 (``spade
convert -a 6``: 27 of 160 lines, 13 calibration lines).

Each model runs in its own ``spade serve`` process (``--size 160x160``: deployed on the engine
measured fastest here and warmed up before its readiness line). Latency: every slice is streamed
on a connection of its own (connect, XML header, the slice's lines, close) and timed from the
connect to its image's arrival; the models take turns slice by slice, the order alternating
between rounds, the first round untimed; per slice the median over the timed rounds, then the
mean over slices. The server's meta attributes split it: ESPIRiT maps and the deployed loop.
Throughput: each model serves the test volumes once with one client streaming both volumes one
after the other, then with two clients streaming one volume each at the same time; slices per
second of wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPADE = str(Path(sys.executable).parent / "spade")
FINETUNE = ["--strategy", "supervised", "--epochs", "2", "--lr", "5e-4"]


def run(*args, env=None) -> None:
    print("$ spade " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    subprocess.run([SPADE, *map(str, args)], check=True, env=env, stdout=subprocess.DEVNULL)


def models(work: Path, pruned: Path | None, env: dict) -> dict[str, Path]:
    from spade_deploy.models import bundled_path

    base = bundled_path("deq", "small")
    if pruned is None:
        pruned_dir = work / "pruned"
        raw = pruned_dir / f"{base.stem}.pruned-0.4.safetensors"
        if not raw.is_file():
            run("prune", base, "-r", "0.4", "-o", pruned_dir, env=env)
        run_dir = pruned_dir / f"{raw.stem}.supervised"
        pruned = run_dir / "best.safetensors"
        if not pruned.is_file():
            run("finetune", raw, *FINETUNE, "-o", run_dir, env=env)
    return {"unpruned": base, "pruned 0.4": pruned}


def streams(work: Path, env: dict) -> list[Path]:
    from spade_deploy.mri.simulate import build_default_dataset
    from spade_deploy.mri.convert import fastmri_to_raw

    data = Path(env["SPADE_DATA"])
    build_default_dataset(data)
    out = []
    for src in sorted((data / "test").glob("*.h5")):
        dst = work / "raw" / src.name
        if not dst.is_file():
            fastmri_to_raw(src, dst, acceleration=6)
        out.append(dst)
    return out


class Server:
    def __init__(self, checkpoint: Path, env: dict, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([SPADE, "serve", str(checkpoint), "--port", "0", "--size", "160x160"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        until = time.monotonic() + 900
        while time.monotonic() < until:
            text = log.read_text()
            if "ready: listening on" in text:
                line = next(l for l in text.splitlines() if "ready: listening on" in l)
                self.ready = line
                self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"spade serve {checkpoint} ended:\n{text}")
            time.sleep(0.2)
        raise SystemExit(f"spade serve {checkpoint} not ready in 900 s")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)
        self.log.close()


def stream(port: int, xml: str, acqs: list) -> tuple[list, list[float], float]:
    """One connection: header, ``acqs``, close; the images and their arrival times after the connect."""
    from spade_deploy.mri.mrd_stream import MessageReader, MessageWriter

    t0 = time.perf_counter()
    sock = socket.create_connection(("127.0.0.1", port))
    got, times, error = [], [], []

    def receive():
        reader = MessageReader(sock)
        while True:
            msg = reader.next()
            if msg.name == "image":
                got.append(msg.value)
                times.append(time.perf_counter() - t0)
            elif msg.name == "text":
                error.append(msg.value)
            elif msg.name == "close":
                return

    rx = threading.Thread(target=receive)
    rx.start()
    w = MessageWriter(sock)
    w.config_file("spade")
    w.header(xml)
    for acq in acqs:
        w.acquisition(acq)
    w.close()
    rx.join()
    sock.close()
    if error:
        raise SystemExit(f"server error: {error[0]}")
    return got, times, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/serve-latency"), help="models, data and logs")
    ap.add_argument("--pruned", type=Path, default=None, help="the pruned 0.4 checkpoint (default: made in --work)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (after one untimed)")
    ap.add_argument("--out", type=Path, default=None, help="also write serve-latency-cpu.{md,json} here")
    args = ap.parse_args()
    from spade_deploy.mri.ismrmrd_raw import acquisitions

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SPADE_DATA": str(work / "data"), "XDG_CACHE_HOME": str(work / "cache"),
           "SPADE_AUTO_ENGINES": os.environ.get("SPADE_AUTO_ENGINES", "torch,onnxruntime")}
    ckpts = models(work, args.pruned, env)
    files = streams(work, env)
    volumes = [acquisitions(f) for f in files]
    slices = []  # (volume, slice, xml, lines of that slice)
    for v, (xml, acqs) in enumerate(volumes):
        for s in sorted({a.idx.slice for a in acqs}):
            slices.append((v, s, xml, [a for a in acqs if a.idx.slice == s]))
    servers = {name: Server(path, env, work / f"serve-{name.replace(' ', '-')}.log") for name, path in ckpts.items()}
    try:
        names = list(servers)
        lat = {n: {i: [] for i in range(len(slices))} for n in names}
        split = {n: {i: [] for i in range(len(slices))} for n in names}
        for r in range(args.rounds + 1):
            for i, (v, s, xml, acqs) in enumerate(slices):
                for n in (names if (r + i) % 2 == 0 else names[::-1]):
                    images, times, _ = stream(servers[n].port, xml, acqs)
                    if r == 0:
                        continue  # untimed: first connection of each slice
                    m = images[0].meta
                    lat[n][i].append(times[0])
                    split[n][i].append((float(m["SpadeMapsMs"]), float(m["SpadeReconMs"]),
                                        int(m.get("SpadeIterations", 0))))
            print(f"round {r}/{args.rounds} done", file=sys.stderr, flush=True)
        result = {"rounds": args.rounds, "slices": len(slices), "models": {}}
        for n in names:
            per_slice = [statistics.median(lat[n][i]) * 1000 for i in range(len(slices))]
            maps = [statistics.median(x[0] for x in split[n][i]) for i in range(len(slices))]
            loop = [statistics.median(x[1] for x in split[n][i]) for i in range(len(slices))]
            iters = [statistics.median(x[2] for x in split[n][i]) for i in range(len(slices))]
            result["models"][n] = {"checkpoint": str(ckpts[n]), "ready": servers[n].ready,
                                   "latency_ms": float(np.mean(per_slice)), "maps_ms": float(np.mean(maps)),
                                   "loop_ms": float(np.mean(loop)), "iterations": float(np.mean(iters)),
                                   "per_slice_ms": per_slice}
        # throughput: one client streaming both volumes in turn, then two clients at once
        for n in names:
            t0 = time.perf_counter()
            count = sum(len(stream(servers[n].port, xml, acqs)[0]) for xml, acqs in volumes)
            one = count / (time.perf_counter() - t0)
            done = []
            threads = [threading.Thread(target=lambda x=x, a=a: done.append(len(stream(servers[n].port, x, a)[0])))
                       for x, a in volumes]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            two = sum(done) / (time.perf_counter() - t0)
            result["models"][n].update(one_client_slices_per_s=one, two_clients_slices_per_s=two)
    finally:
        for srv in servers.values():
            srv.stop()
    u, p = result["models"]["unpruned"], result["models"]["pruned 0.4"]
    result["speedup"] = {"latency": u["latency_ms"] / p["latency_ms"], "loop": u["loop_ms"] / p["loop_ms"],
                         "two_clients_throughput": p["two_clients_slices_per_s"] / u["two_clients_slices_per_s"]}
    import torch

    result["machine"] = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    cmd = ("OMP_NUM_THREADS=1 python benchmarks/serve_latency.py" + (f" --rounds {args.rounds}" if args.rounds != 3 else "")
           + (" --pruned " + str(args.pruned) if args.pruned else "") + (f" --out {args.out}" if args.out else ""))
    lines = [f"`{cmd}` ({platform.machine()} CPU, torch {torch.__version__}, OMP_NUM_THREADS="
             f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {len(slices)} slices of 160 x 160 x 8 coils at "
             f"acceleration 6, median of {args.rounds} rounds per slice, mean over slices)", "",
             "| model | latency per slice (ms) | ESPIRiT maps (ms) | deployed loop (ms) | iterations "
             "| slices/s, 1 client | slices/s, 2 clients |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for n, m in result["models"].items():
        lines.append(f"| {n} | {m['latency_ms']:.0f} | {m['maps_ms']:.0f} | {m['loop_ms']:.0f} | {m['iterations']:.1f} "
                     f"| {m['one_client_slices_per_s']:.2f} | {m['two_clients_slices_per_s']:.2f} |")
    s = result["speedup"]
    lines += ["", f"Pruned 0.4 against unpruned: end-to-end latency x{s['latency']:.2f}, deployed loop "
                  f"x{s['loop']:.2f}, throughput with two clients x{s['two_clients_throughput']:.2f}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve-latency-cpu.md").write_text(text)
        (args.out / "serve-latency-cpu.json").write_text(json.dumps({"command": cmd, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
