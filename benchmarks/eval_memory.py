"""Peak memory of `spade eval` on fastMRI-sized volumes, scored volume by volume against the
code that kept every slice's arrays to the end; and the coil-map cache holding its budget.

    OMP_NUM_THREADS=1 python benchmarks/eval_memory.py [--volumes 1 8] [--old-commit 6781346] [--out benchmarks/results]

Data: one synthetic fastMRI-sized file, 16 slices of 16-coil 640 x 320 k-space (readout
oversampled: the object fills the central 320 rows, `reconstruction_rss` and the header's recon
size are 320 x 320), made with the simulation's acquisition (:func:`spade_deploy.mri.simulate.acquire`:
a smooth elliptical phantom with quadratic phase, 16 ring coils, complex noise at SNR 100) and
hard-linked under as many names as a run has volumes (the reader sees distinct files; the disk
holds one). The file carries its coil maps and `spade eval` runs with `--coil-maps file`: ESPIRiT
at this size takes seconds per slice on this CPU, and the memory measured is evaluation's, not
the maps'. Model: an untrained tiny DEQ, `--max-iter 3` (memory does not depend on the weights or
the iteration count), batch size 4 (the default).

Peak memory: the resident-set high-water mark of the `spade eval` process (``ru_maxrss`` from
``os.wait4``; RSS includes the Python interpreter, torch and the model). Each measurement is a
fresh process; "old" runs the tree of ``--old-commit`` (extracted by ``git archive``, imported
ahead of the installed package) on the same data, "new" this working tree or ``--new-commit``'s. The growth of the peak from 1 to V volumes is
what evaluation holds across volumes: "one volume's arrays" is the per-slice scoring arrays a
volume keeps (target, reconstruction, zero-filled and SENSE reference, 320 x 320 float32 each:
26.2 MB for 16 slices) beside the volume's k-space (16 x 16 x 640 x 320 complex64: 419 MB, read a
batch at a time).

Cache: `spade maps` on a ``--cache-slices``-slice file of the same size (4) with ``--cache-size``
(60M: room for two 26.2 MB maps): the cache's entries and bytes after, the time per slice
(ESPIRiT's, with the process's start), and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SLICES, COILS, HEIGHT, WIDTH, RECON = 16, 16, 640, 320, 320


def _coil_maps(coils: int, h: int, w: int) -> np.ndarray:
    """Smooth ring-coil sensitivities over the whole field of view, sum |S|^2 = 1."""
    y, x = np.meshgrid(np.linspace(-2, 2, h), np.linspace(-1, 1, w), indexing="ij")
    ang = 2 * np.pi * np.arange(coils) / coils
    cy, cx = 1.4 * np.sin(ang), 1.4 * np.cos(ang)
    d2 = (y[None] - cy[:, None, None]) ** 2 + (x[None] - cx[:, None, None]) ** 2 + 0.3
    s = np.exp(1j * np.arctan2(y[None] - cy[:, None, None], x[None] - cx[:, None, None])) / d2**0.75
    return (s / np.sqrt((np.abs(s) ** 2).sum(0, keepdims=True))).astype(np.complex64)


def _header(h: int, w: int, recon: int) -> str:
    def space(x, y):
        return (f"<matrixSize><x>{x}</x><y>{y}</y><z>1</z></matrixSize>"
                f"<fieldOfView_mm><x>{x * 0.7:g}</x><y>{y * 0.7:g}</y><z>5</z></fieldOfView_mm>")
    return ('<?xml version="1.0" encoding="utf-8"?>\n<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
            f"<encoding><encodedSpace>{space(h, w)}</encodedSpace><reconSpace>{space(recon, recon)}</reconSpace>"
            f"<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{w - 1}</maximum>"
            f"<center>{w // 2}</center></kspace_encoding_step_1></encodingLimits><trajectory>cartesian</trajectory>"
            "</encoding></ismrmrdHeader>")


def make_file(path: Path, slices: int, seed: int = 0) -> Path:
    """A fastMRI-format file of ``slices`` 16-coil 640 x 320 slices, written a slice at a time."""
    from spade_deploy.mri.simulate import acquire

    rng = np.random.default_rng(seed)
    smaps = _coil_maps(COILS, HEIGHT, WIDTH)
    y, x = np.meshgrid(np.linspace(-2, 2, HEIGHT), np.linspace(-1, 1, WIDTH), indexing="ij")
    path.parent.mkdir(parents=True, exist_ok=True)
    top = (HEIGHT - RECON) // 2
    with h5py.File(path, "w") as f:
        k = f.create_dataset("kspace", (slices, COILS, HEIGHT, WIDTH), np.complex64, chunks=(1, COILS, HEIGHT, WIDTH))
        s = f.create_dataset("sens_maps", (slices, COILS, HEIGHT, WIDTH), np.complex64, chunks=(1, COILS, HEIGHT, WIDTH))
        r = f.create_dataset("reconstruction_rss", (slices, RECON, RECON), np.float32)
        for i in range(slices):
            a, b = 0.75 + 0.1 * rng.random(), 0.8 + 0.1 * rng.random()
            inner = ((y / a) ** 2 + (x / b) ** 2 < 1).astype(float) * (0.6 + 0.4 * ((y / a) ** 2 + (x / b) ** 2 > 0.6))
            phase = rng.normal(0, 0.5, 3)
            img = inner * np.exp(1j * (phase[0] + phase[1] * x + phase[2] * y * y))
            kk, ss, rr = acquire(img[None], smaps[None], 100.0, rng)
            k[i], s[i] = kk[0], ss[0]
            r[i] = rr[0, top : top + RECON, (WIDTH - RECON) // 2 : (WIDTH - RECON) // 2 + RECON]
        f["ismrmrd_header"] = _header(HEIGHT, WIDTH, RECON)
        f.attrs["max"] = float(np.max(r[()]))
        f.attrs["acquisition"] = "AXT2"
    return path


def commit_tree(commit: str, where: Path) -> Path:
    """The ``spade_deploy`` and ``cli`` packages of ``commit`` under ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    archive = where / "tree.tar"
    with open(archive, "wb") as fh:
        subprocess.run(["git", "-C", str(REPO), "archive", commit, "spade_deploy", "cli"], stdout=fh, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(where, filter="data")
    archive.unlink()
    return where


# The `spade` command as the venv's script runs it, from the tree given as the working folder
# (its packages imported ahead of the installed one: checked, the module's file printed).
_LAUNCH = ("import sys, spade_deploy; print('imported', spade_deploy.__file__, file=sys.stderr); "
           "sys.argv = ['spade'] + sys.argv[1:]; from cli.main import main; main()")


def peak_rss(tree: Path, args: list[str], env: dict) -> tuple[int, float, str]:
    """``spade args`` run from ``tree`` in a fresh process: (peak RSS bytes, seconds, its output)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, *args], cwd=tree, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"spade {' '.join(args)} failed ({proc.returncode}):\n{out}")
    imported = next(line for line in out.splitlines() if line.startswith("imported "))
    if not Path(imported.split(" ", 1)[1]).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: the installed package was imported instead: {imported}")
    return usage.ru_maxrss * 1024, seconds, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--old-commit", default="6781346", help="the commit whose evaluation kept every slice's arrays")
    ap.add_argument("--new-commit", default=None, help="measure this commit's tree as 'new' (default: this working tree)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--skip-cache", action="store_true")
    ap.add_argument("--cache-slices", type=int, default=4, help="slices of the file `spade maps` runs on")
    ap.add_argument("--cache-size", default="60M", help="its --cache-size (60M: two 25 MiB maps)")
    a = ap.parse_args()

    import torch

    from spade_deploy.checkpoint import save_model
    from spade_deploy.models import build_model

    work = Path(a.work or tempfile.mkdtemp(prefix="eval-memory-"))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "COLUMNS": "200",
           "XDG_CACHE_HOME": str(work / "cache")}
    source = work / "fastmri" / "file_brain_AXT2_000.h5"
    if not source.exists():
        t0 = time.perf_counter()
        make_file(source, SLICES)
        print(f"made {source} ({source.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    torch.manual_seed(0)
    ckpt = save_model(work / "deq-tiny.safetensors", build_model("deq", preset="tiny"))
    trees = {"new": commit_tree(a.new_commit, work / "new") if a.new_commit else REPO,
             "old": commit_tree(a.old_commit, work / "old")}
    runs = []
    for v in a.volumes:
        root = work / f"data-{v}"
        (root / "test").mkdir(parents=True, exist_ok=True)
        for i in range(v):
            link = root / "test" / f"file_brain_AXT2_{i:03d}.h5"
            if not link.exists():
                os.link(source, link)
        for name, tree in trees.items():
            args = ["eval", str(ckpt), "--data", str(root), "--split", "test", "--coil-maps", "file",
                    "--max-iter", "3", "--json", str(work / f"eval-{name}-{v}.json")]
            rss, seconds, _ = peak_rss(tree, args, env)
            scores = json.loads((work / f"eval-{name}-{v}.json").read_text())
            runs.append({"code": name, "volumes": v, "slices": v * SLICES, "peak_rss_bytes": rss,
                         "seconds": round(seconds, 1), "psnr": scores["psnr"], "ssim": scores["ssim"]})
            print(f"{name:>3} {v:2d} volumes: peak RSS {rss / 2**20:7.1f} MiB, {seconds:6.1f} s, "
                  f"PSNR {scores['psnr']:.4f}")
    volume_arrays = SLICES * 4 * RECON * RECON * 4
    kspace_volume = SLICES * COILS * HEIGHT * WIDTH * 8
    growth = {}
    for name in trees:
        by_v = {r["volumes"]: r["peak_rss_bytes"] for r in runs if r["code"] == name}
        lo, hi = min(by_v), max(by_v)
        growth[name] = {"from_volumes": lo, "to_volumes": hi, "bytes": by_v[hi] - by_v[lo],
                        "per_volume_bytes": (by_v[hi] - by_v[lo]) / max(hi - lo, 1)}

    cache = None
    if not a.skip_cache:
        from spade_deploy.mri.coilmaps import parse_size

        small = work / f"maps-{a.cache_slices}" / "file_brain_AXT2_100.h5"
        if not small.exists():
            make_file(small, a.cache_slices, seed=1)
        budget = parse_size(a.cache_size)
        shutil.rmtree(work / "maps-cache", ignore_errors=True)
        maps_args = ["maps", str(small.parent), "--cache-dir", str(work / "maps-cache"), "--cache-size", a.cache_size]
        rss, seconds, out = peak_rss(REPO, maps_args, env)
        entries = sorted((work / "maps-cache" / "espirit").glob("*.npy"))
        total = sum(p.stat().st_size for p in entries)
        cache = {"slices": a.cache_slices, "budget_bytes": budget, "cache_size": a.cache_size, "entries": len(entries), "bytes": total,
                 "entry_bytes": entries[0].stat().st_size if entries else None, "within_budget": total <= budget,
                 "seconds": round(seconds, 1), "seconds_per_slice": round(seconds / a.cache_slices, 1), "peak_rss_bytes": rss,
                 "command_output": out.strip().splitlines()[-1]}
        print(f"maps: {len(entries)} entries, {total / 2**20:.1f} MiB of the {budget / 2**20:.0f} MiB budget, "
              f"{seconds:.0f} s for {a.cache_slices} slices, peak RSS {rss / 2**20:.0f} MiB")

    result = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/eval_memory.py " + " ".join(sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "omp_threads": env["OMP_NUM_THREADS"]},
        "data": {"slices": SLICES, "coils": COILS, "kspace": [HEIGHT, WIDTH], "recon": [RECON, RECON],
                 "coil_maps": "file (the simulation's)", "model": "deq tiny, untrained, --max-iter 3, batch size 4"},
        "measure": "ru_maxrss of the spade eval process (os.wait4), bytes",
        "old_commit": a.old_commit,
        "new_commit": a.new_commit or "working tree",
        "one_volume_scoring_arrays_bytes": volume_arrays,
        "one_volume_kspace_bytes": kspace_volume,
        "runs": runs,
        "growth": growth,
        "cache": cache,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "eval-memory-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    mib = 2**20
    lines = [
        "# Peak memory of `spade eval`, volume by volume (CPU)",
        "",
        f"`{result['command']}` ({platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{env['OMP_NUM_THREADS']} thread(s)).",
        "",
        f"Data: synthetic fastMRI-sized volumes, {SLICES} slices of {COILS}-coil {HEIGHT} x {WIDTH} k-space "
        f"(recon {RECON} x {RECON}), the file's coil maps (`--coil-maps file`); tiny DEQ, `--max-iter 3`, "
        "batch size 4. Peak = the resident-set high-water mark of the `spade eval` process (ru_maxrss); "
        f"new = {('commit ' + a.new_commit) if a.new_commit else 'this working tree'}; old = commit {a.old_commit}, "
        "which kept every slice's arrays until the end.",
        "",
        "| code | volumes | slices | peak RSS (MiB) | seconds | PSNR |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *[f"| {r['code']} | {r['volumes']} | {r['slices']} | {r['peak_rss_bytes'] / mib:.1f} | {r['seconds']} | "
          f"{r['psnr']:.4f} |" for r in runs],
        "",
        *[f"- {name}: peak grows {g['bytes'] / mib:+.1f} MiB from {g['from_volumes']} to {g['to_volumes']} volumes "
          f"({g['per_volume_bytes'] / mib:+.1f} MiB per volume)" for name, g in growth.items()],
        f"- one volume's scoring arrays (target, reconstruction, zero-filled, SENSE reference; {SLICES} x 4 x "
        f"{RECON} x {RECON} float32): {volume_arrays / mib:.1f} MiB; its k-space: {kspace_volume / mib:.0f} MiB "
        "(read a batch at a time)",
    ]
    if cache:
        lines += ["", "## Coil-map cache",
                  "",
                  f"`spade maps` on {cache['slices']} slices of the same size with `--cache-size {cache['cache_size']}`: "
                  f"{cache['entries']} maps of {cache['entry_bytes'] / mib:.1f} MiB kept, "
                  f"{cache['bytes'] / mib:.1f} MiB of the {cache['budget_bytes'] / mib:.0f} MiB budget "
                  f"(within: {cache['within_budget']}); {cache['seconds']} s in all "
                  f"({cache['seconds_per_slice']} s a slice with start-up), peak RSS {cache['peak_rss_bytes'] / mib:.0f} MiB.",
                  "", f"Its last line: `{cache['command_output']}`"]
    (a.out / "eval-memory-cpu.md").write_text("\n".join(lines) + "\n")
    print((a.out / "eval-memory-cpu.md").read_text())


if __name__ == "__main__":
    main()
