"""Hostile input through the real CLI: malformed HDF5, tampered checkpoints and export manifests,
path tricks, an output that is an input, bad options. Each must give exit status 1, exactly one
``error:`` line, no traceback, and leave every file of the workspace as it was (same names, bytes
and modification times: nothing created, changed or removed)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli.main import app
from spade_deploy.checkpoint import save_model
from spade_deploy.errors import SpadeError
from spade_deploy.io import load_checkpoint, save_checkpoint
from spade_deploy.models import build_model
from spade_deploy.prune import prune_checkpoint

runner = CliRunner()


def _kspace_file(path: Path, slices=2, coils=4, size=(16, 16), seed=0, **over):
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((slices, coils, *size)) + 1j * rng.standard_normal((slices, coils, *size))).astype(np.complex64)
    s = (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)).astype(np.complex64)
    arrays = {"kspace": k, "reconstruction_rss": np.abs(k).sum(1).astype(np.float32),
              "sens_maps": (s / np.sqrt((np.abs(s) ** 2).sum(1, keepdims=True))).astype(np.complex64)}
    arrays.update(over)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            if value is not None:
                f[key] = value
    return path


def _tampered(src: Path, dst: Path, edit=None, tensors=None) -> Path:
    """A copy of checkpoint ``src`` with its manifest edited by ``edit`` (or its tensors by ``tensors``)."""
    state, manifest = load_checkpoint(src)
    manifest = json.loads(json.dumps(manifest))
    if edit is not None:
        manifest = edit(manifest) or manifest
    if tensors is not None:
        tensors(state)
    if isinstance(manifest, dict):
        save_checkpoint(dst, state, manifest)  # the manifest's own "format" wins over the default
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata={"spade_manifest": json.dumps(manifest)})
    return dst


def _set(path: list, value):
    def edit(m):
        node = m
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _all_convs(width):
    def edit(m):
        m["shapes"] = {name: [width, width] for name in m["shapes"]}
    return edit


# name -> manifest edit (or tensor edit) of the good DEQ checkpoint, given to `spade eval`.
CHECKPOINT_CASES = {
    "config-list": _set(["config"], [1, 2, 3]),
    "config-string": _set(["config"], "n_feats=16"),
    "field-negative": _set(["config", "n_feats"], -16),
    "field-string": _set(["config", "n_feats"], "16"),
    "field-float": _set(["config", "n_feats"], 16.5),
    "field-bool": _set(["config", "n_blocks"], True),
    "field-list": _set(["config", "n_blocks"], [2]),
    "field-huge": _set(["config", "n_feats"], 10**6),
    "field-nan": _set(["config", "gamma_init"], float("nan")),
    "field-unknown": _set(["config", "evil"], 1),
    "solver-max-iter": _set(["config", "max_iter"], 10**9),
    "solver-tol": _set(["config", "tol"], 1e-30),
    "solver-unknown": _set(["config", "solver"], "newton"),
    "wide-and-deep": lambda m: m["config"].update(n_blocks=10_000, n_feats=10_000),
    "model-unknown": _set(["model"], "resnet"),
    "model-missing": lambda m: m.pop("model") and None,
    "shapes-list": _set(["shapes"], [[2, 16]]),
    "shapes-negative": _all_convs(-16),
    "shapes-string": _all_convs("16"),
    "shapes-huge": _all_convs(10**6),
    "shapes-36TB": _all_convs(10_000),
    "shapes-unknown-layer": lambda m: m["shapes"].update({"prior.evil": [16, 16]}),
    "manifest-list": lambda m: [m],
    "format": _set(["format"], "spade-deploy/99"),
    "pruning-string": _set(["pruning"], "0.4"),
    "pruning-ratio-string": _set(["pruning"], {"ratio": "x"}),
    "pruning-parent-list": _set(["pruning"], {"ratio": 0.4, "parent": [1]}),
    "finetune-list": _set(["finetune"], [1]),
    "train-state-list": _set(["train_state"], [1]),
}
TENSOR_CASES = {
    "nan-weights": lambda s: s["prior.head.weight"].view(-1).__setitem__(0, float("nan")),
    "inf-weights": lambda s: s["prior.head.bias"].__setitem__(0, float("inf")),
    "missing-tensor": lambda s: s.pop("prior.head.bias"),
    "wrong-shape": lambda s: s.__setitem__("prior.head.bias", torch.zeros(3)),
}

# name -> (edit of the good export manifest or None, the file to write instead).
def _prior(key, value):
    def edit(m, ws):
        m["priors"][0][key] = value(ws) if callable(value) else value
    return edit


EXPORT_CASES = {
    "no-priors": lambda m, ws: m.pop("priors") and None,
    "priors-empty": lambda m, ws: m.update(priors=[]),
    "priors-string": lambda m, ws: m.update(priors="prior"),
    "unknown-prior": _prior("name", "evil"),
    "prior-twice": lambda m, ws: m["priors"].append(dict(m["priors"][0])),
    "unknown-input": lambda m, ws: m.update(input="z"),
    "unknown-output": lambda m, ws: m.update(output="logits"),
    "onnx-absolute": _prior("onnx", lambda ws: str((ws / "other-engines" / "good.pruned-0.4.prior.onnx").resolve())),
    "onnx-dotdot": _prior("onnx", "../other-engines/good.pruned-0.4.prior.onnx"),
    "onnx-missing": _prior("onnx", "nothing.onnx"),
    "onnx-not-string": _prior("onnx", 3),
    "onnx-of-another-model": None,  # the pruned model's ONNX copied over this one's
    "onnx-symlink-out": None,  # the ONNX replaced by a link leading out of the folder
    "model-other": lambda m, ws: m.update(model="varnet"),
    "bad-hash": lambda m, ws: m.update(checkpoint_sha256="xyz"),
    "bad-file-hash": _prior("sha256", "0" * 64),
    "manifest-list": lambda m, ws: [m],
    "not-json": None,
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The workspace every case runs in: data, checkpoints (good and tampered), exports."""
    ws = tmp_path_factory.mktemp("hostile")
    data = ws / "data"
    for i, split in enumerate(("train", "val", "test")):
        _kspace_file(data / split / "file.h5", seed=i)
    torch.manual_seed(0)
    good = save_model(ws / "good.safetensors", build_model("deq", preset="tiny"))
    bad = ws / "bad"
    bad.mkdir()
    for name, edit in CHECKPOINT_CASES.items():
        _tampered(good, bad / f"{name}.safetensors", edit=edit)
    for name, edit in TENSOR_CASES.items():
        _tampered(good, bad / f"{name}.safetensors", tensors=edit)
    save_file({"w": torch.zeros(2)}, str(bad / "no-manifest.safetensors"))
    save_file({"w": torch.zeros(2)}, str(bad / "manifest-not-json.safetensors"), metadata={"spade_manifest": "{oops"})
    (bad / "empty.safetensors").write_bytes(b"")
    (bad / "text.safetensors").write_text("hello")
    (bad / "pickled.safetensors").write_bytes(pickle.dumps({"a": 1}))

    # fastMRI checkpoints for `import`
    imp = ws / "import"
    imp.mkdir()
    torch.save(build_model("e2e-varnet", preset="tiny").state_dict(), imp / "varnet.pt")
    (imp / "empty.pt").write_bytes(b"")
    (imp / "text.pt").write_text("not a checkpoint")
    torch.save([1, 2, 3], imp / "list.pt")
    torch.save({}, imp / "emptydict.pt")
    torch.save({"cascades.0.x": torch.zeros(())}, imp / "scalar.pt")
    torch.save({1: torch.zeros(2)}, imp / "intkeys.pt")
    (imp / "pickled.pt").write_bytes(pickle.dumps(object))
    os.symlink(imp / "varnet.pt", imp / "link.pt")

    # malformed HDF5, each in its own data folder
    h5 = ws / "h5"
    with h5py.File(_mk(h5 / "huge" / "test") / "huge.h5", "w") as f:  # 1000 x 64 x 4096 x 4096 declared, nothing stored
        f.create_dataset("kspace", shape=(1000, 64, 4096, 4096), dtype=np.complex64, chunks=(1, 1, 64, 64))
    _kspace_file(h5 / "rank3" / "test" / "f.h5", kspace=np.zeros((2, 16, 16), np.complex64), reconstruction_rss=None, sens_maps=None)
    _kspace_file(h5 / "real" / "test" / "f.h5", kspace=np.zeros((2, 4, 16, 16), np.float32), sens_maps=None)
    _kspace_file(h5 / "nokspace" / "test" / "f.h5", kspace=None, sens_maps=None)
    _kspace_file(h5 / "empty" / "test" / "f.h5", kspace=np.zeros((0, 4, 16, 16), np.complex64), reconstruction_rss=None,
                 sens_maps=None)
    _kspace_file(h5 / "nan" / "test" / "f.h5", kspace=np.full((2, 4, 16, 16), np.nan, np.complex64))
    _kspace_file(h5 / "rss-shape" / "test" / "f.h5", reconstruction_rss=np.zeros((3, 16, 16), np.float32))
    _kspace_file(h5 / "smaps-shape" / "test" / "f.h5", sens_maps=np.ones((2, 3, 16, 16), np.complex64))
    _kspace_file(h5 / "one-pixel" / "test" / "f.h5", size=(1, 1))
    (_mk(h5 / "text" / "test") / "f.h5").write_text("not HDF5")
    _mk(h5 / "nofiles" / "test")

    # exports: the good one, a pruned model's, and tampered copies of the good one
    assert runner.invoke(app, ["export", str(good), "-o", str(ws / "engines")]).exit_code == 0
    (pruned, _), = prune_checkpoint(good, [0.4], ws / "pruned")
    assert runner.invoke(app, ["export", str(pruned), "-o", str(ws / "other-engines")]).exit_code == 0
    manifest = json.loads((ws / "engines" / "good.manifest.json").read_text())
    for name, edit in EXPORT_CASES.items():
        folder = ws / "tampered" / name
        shutil.copytree(ws / "engines", folder)
        if name == "onnx-of-another-model":
            shutil.copy(ws / "other-engines" / "good.pruned-0.4.prior.onnx", folder / "good.prior.onnx")
        elif name == "onnx-symlink-out":
            (folder / "good.prior.onnx").unlink()
            os.symlink(ws / "other-engines" / "good.pruned-0.4.prior.onnx", folder / "good.prior.onnx")
        elif name == "not-json":
            (folder / "good.manifest.json").write_text("{ not json")
        else:
            m = json.loads(json.dumps(manifest))
            m = edit(m, ws) or m
            (folder / "good.manifest.json").write_text(json.dumps(m))

    # path tricks
    run = ws / "run"
    run.mkdir()
    shutil.copy(pruned, run / "best.safetensors")
    os.symlink(good, ws / "link-to-good.safetensors")
    os.link(good, ws / "hardlink-to-good.json")
    _mk(ws / "pruned-trick")
    os.symlink(good, ws / "pruned-trick" / "good.pruned-0.1.safetensors")
    _mk(ws / "export-trick")
    os.symlink(good, ws / "export-trick" / "good.manifest.json")

    # super-resolution: a USRNet checkpoint, bad kernels, bad image folders
    from PIL import Image

    save_model(ws / "usrnet.safetensors", build_model("usrnet", preset="tiny"))
    sr = _mk(ws / "sr")
    np.save(sr / "k3d.npy", np.full((3, 5, 5), 1 / 75))
    np.save(sr / "unnormalised.npy", np.ones((5, 5)))
    np.save(sr / "huge.npy", np.full((99, 99), 1 / 99**2))
    rgb = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for split in ("train", "val", "test"):
        Image.fromarray(rgb).save(_mk(sr / "deep" / split) / "a.png")
        Image.fromarray(rgb[:6, :6]).save(_mk(sr / "small" / split) / "a.png")
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(sr / "deep" / "test" / "b.png")  # 16-bit greyscale
    return ws


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _snapshot(root: Path) -> dict:
    """Every entry under ``root`` with its kind, size, mtime and content hash (links not followed)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                snap[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                snap[str(p)] = ("dir",)
            else:
                snap[str(p)] = ("file", st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return snap


def _cases():
    g = "{ws}/good.safetensors"
    d = "{ws}/data"
    cases = []

    def add(name, args, match):
        cases.append(pytest.param(args, match, id=name))

    for name in list(CHECKPOINT_CASES) + list(TENSOR_CASES) + ["no-manifest", "manifest-not-json", "empty", "text", "pickled"]:
        match = {"manifest-list": "not a JSON object", "format": "unsupported checkpoint format",
                 "nan-weights": "NaN or infinite", "inf-weights": "NaN or infinite",
                 "shapes-36TB": "more than this machine", "wide-and-deep": "more than this machine",
                 "solver-max-iter": "max_iter", "solver-tol": "tol"}.get(name, "")
        add(f"checkpoint-{name}", ["eval", f"{{ws}}/bad/{name}.safetensors", "--data", d], match)
    # the same tampering through every other command that loads a checkpoint
    for cmd in (["export", "{ckpt}", "-o", "{ws}/out-export"], ["prune", "{ckpt}", "-o", "{ws}/out-prune"],
                ["reconstruct", "{ckpt}", f"{d}/test", "-o", "{ws}/out-rec"],
                ["finetune", "{ckpt}", "-s", "supervised", "--data", d, "-o", "{ws}/out-ft"],
                ["bench", "{ckpt}", "-b", "torch", "--data", d, "-o", "{ws}/out-bench", "--engines", "{ws}/out-eng"]):
        for name in ("shapes-36TB", "nan-weights", "solver-tol", "pruning-string", "pruning-ratio-string"):
            add(f"{cmd[0]}-{name}", [a.replace("{ckpt}", f"{{ws}}/bad/{name}.safetensors") for a in cmd], "")
    add("directory-as-checkpoint", ["eval", "{ws}/bad", "--data", d], "folder")

    for name in ("huge", "rank3", "real", "nokspace", "empty", "nan", "rss-shape", "smaps-shape", "one-pixel", "text", "nofiles"):
        match = {"huge": "would not fit", "one-pixel": ""}.get(name, "")
        add(f"hdf5-eval-{name}", ["eval", g, "--data", f"{{ws}}/h5/{name}"], match)
        if name != "one-pixel":  # a 1 x 1 image reconstructs; only its SSIM is undefined
            add(f"hdf5-reconstruct-{name}", ["reconstruct", g, f"{{ws}}/h5/{name}/test", "-o", "{ws}/out-rec"], match)

    for name in EXPORT_CASES:
        match = {"unknown-prior": "priors", "no-priors": "no priors", "onnx-absolute": "outside",
                 "onnx-dotdot": "outside", "onnx-of-another-model": "hash", "onnx-symlink-out": "outside",
                 "unknown-input": "input"}.get(name, "")
        add(f"export-manifest-{name}", ["bench", g, "-b", "onnxruntime", "--repeats", "1", "--warmup", "0", "--data", d,
                                        "--engines", f"{{ws}}/tampered/{name}", "-o", "{ws}/out-bench"], match)

    # an output that is an input, or lies in the data folder
    for name, args in {
        "import-onto-itself": ["import", "{ws}/import/varnet.pt", "-o", "{ws}/import/varnet.pt"],
        "import-onto-symlink": ["import", "{ws}/import/varnet.pt", "-o", "{ws}/import/link.pt"],
        "eval-json-onto-checkpoint": ["eval", g, "--data", d, "--json", g],
        "eval-json-onto-symlinked-checkpoint": ["eval", "{ws}/link-to-good.safetensors", "--data", d, "--json", g],
        "eval-json-onto-hardlink": ["eval", g, "--data", d, "--json", "{ws}/hardlink-to-good.json"],
        "eval-json-into-data": ["eval", g, "--data", d, "--json", f"{d}/test/eval.json"],
        "reconstruct-into-source": ["reconstruct", g, f"{d}/test", "-o", f"{d}/test"],
        "reconstruct-file-into-its-folder": ["reconstruct", g, f"{d}/test/file.h5", "-o", f"{d}/test"],
        "reconstruct-below-source": ["reconstruct", g, f"{d}/test", "-o", f"{d}/test/recon"],
        "reconstruct-onto-checkpoint": ["reconstruct", g, f"{d}/test", "-o", g],
        "finetune-onto-its-input": ["finetune", "{ws}/run/best.safetensors", "-s", "supervised", "--data", d, "-o", "{ws}/run"],
        "finetune-teacher-onto-output": ["finetune", "{ws}/pruned/good.pruned-0.4.safetensors", "-s", "school", "--teacher",
                                         "{ws}/run/best.safetensors", "--data", d, "-o", "{ws}/run"],
        "train-into-data-root": ["train", "--preset", "tiny", "--data", d, "-o", d],
        "train-into-split": ["train", "--preset", "tiny", "--data", d, "-o", f"{d}/train/run"],
        "prune-onto-symlinked-input": ["prune", g, "-r", "0.1", "-o", "{ws}/pruned-trick"],
        "export-onto-symlinked-input": ["export", g, "-o", "{ws}/export-trick"],
        "export-onto-checkpoint": ["export", g, "-o", g],
        "bench-into-data": ["bench", g, "-b", "torch", "--data", d, "-o", f"{d}/test"],
        "bench-engines-into-data": ["bench", g, "-b", "onnxruntime", "--data", d, "--engines", f"{d}/test/eng", "-o", "{ws}/o"],
    }.items():
        add(f"output-is-input-{name}", args, "")

    bad_options = {
        "train-lr-nan": ["train", "--lr", "nan"], "train-lr-negative": ["train", "--lr", "-1"],
        "train-lr-inf": ["train", "--lr", "inf"], "train-epochs-0": ["train", "--epochs", "0"],
        "train-batch-0": ["train", "--batch-size", "0"], "train-batch-huge": ["train", "--batch-size", "100000000"],
        "train-acceleration-0": ["train", "--acceleration", "0"], "train-cf-2": ["train", "--center-fraction", "2"],
        "train-cf-nan": ["train", "--center-fraction", "nan"], "train-tol-0": ["train", "--train-tol", "0"],
        "train-max-iter-huge": ["train", "--train-max-iter", "1000000000"], "train-pretrain-lr": ["train", "--pretrain-lr", "-1"],
        "train-penalty": ["train", "--lipschitz-on", "bogus"], "train-weight-nan": ["train", "--lipschitz-weight", "nan"],
        "train-seed-negative": ["train", "--seed", "-1"], "train-checkpoint-seconds": ["train", "--checkpoint-seconds", "-1"],
        "train-model": ["train", "--model", "bogus"], "train-preset": ["train", "--preset", "bogus"],
        "finetune-lr-nan": ["finetune", g, "--lr", "nan"], "finetune-strategy": ["finetune", g, "-s", "bogus"],
        "finetune-epochs-0": ["finetune", g, "--epochs", "0"],
    }
    for name, args in bad_options.items():
        add(f"option-{name}", [*args, "--data", d, "-o", "{ws}/out-train"], "")
    # super-resolution: bad kernels, scales, noise and images (the model's task from its checkpoint)
    u = "{ws}/usrnet.safetensors"
    for name, (args, match) in {
        "scale-5": (["eval", u, "--scale", "5"], "scale factor must be one of 1, 2, 3, 4"),
        "scale-0-train": (["train", "-m", "usrnet", "--scale", "0", "-o", "{ws}/out-sr"], "scale factor"),
        "scale-finetune": (["finetune", u, "--scale", "7", "-o", "{ws}/out-sr"], "scale factor"),
        "noise-nan": (["eval", u, "--noise", "nan"], "noise level"),
        "noise-negative": (["eval", u, "--noise", "-0.1"], "noise level"),
        "kernel-3d": (["eval", u, "--kernel", "{ws}/sr/k3d.npy"], "2-D"),
        "kernel-unnormalised": (["eval", u, "--kernel", "{ws}/sr/unnormalised.npy"], "normalised"),
        "kernel-larger-than-patch": (["train", "-m", "usrnet", "--kernel", "{ws}/sr/huge.npy", "-o", "{ws}/out-sr"],
                                     "larger than"),
        "kernel-unknown": (["eval", u, "--kernel", "k13"], "not found"),
        "image-16-bit": (["eval", u, "--data", "{ws}/sr/deep", "--scale", "2", "--kernel", "k1"], "16-bit"),
        "image-smaller-than-multiple": (["eval", u, "--data", "{ws}/sr/small", "--scale", "2"], "smaller than"),
        "split-missing": (["eval", u, "--data", "{ws}/sr", "--scale", "2"], "no test/ folder"),
        "reconstruct-two-scales": (["reconstruct", u, "{ws}/sr/deep/train", "-o", "{ws}/out-sr", "--scale", "2", "--scale", "3",
                                    "--kernel", "k1", "-b", "torch"], "exactly one --scale"),
        "reconstruct-16-bit": (["reconstruct", u, "{ws}/sr/deep/test", "-o", "{ws}/out-sr", "--scale", "2", "--kernel", "k1",
                                "-b", "torch"], "16-bit"),
        "reconstruct-into-source": (["reconstruct", u, "{ws}/sr/deep/train", "-o", "{ws}/sr/deep/train", "--scale", "2",
                                     "--kernel", "k1", "-b", "torch"], "refusing to overwrite"),
        "reconstruct-kernel-larger-than-image": (["reconstruct", u, "{ws}/sr/small/train", "-o", "{ws}/out-sr", "--scale", "2",
                                                  "--kernel", "k1", "-b", "torch"], "larger than"),
    }.items():
        add(f"sr-{name}", args, match)
    for name, args in {
        "eval-max-iter": ["eval", g, "--data", d, "--max-iter", "1000000000"],
        "eval-max-iter-0": ["eval", g, "--data", d, "--max-iter", "0"],
        "eval-tol-tiny": ["eval", g, "--data", d, "--tol", "1e-30"],
        "eval-tol-nan": ["eval", g, "--data", d, "--tol", "nan"],
        "eval-solver": ["eval", g, "--data", d, "--solver", "newton"],
        "eval-split-trick": ["eval", g, "--data", d, "--split", "../data/test"],
        "eval-acceleration": ["eval", g, "--data", d, "--acceleration", "-6"],
        "bench-device": ["bench", g, "--data", d, "--device", "bogus", "-o", "{ws}/o"],
        "bench-device-index": ["bench", g, "--data", d, "--device", "cuda:99", "-o", "{ws}/o"],
        "bench-backend": ["bench", g, "--data", d, "-b", "bogus", "-o", "{ws}/o"],
        "bench-repeats": ["bench", g, "--data", d, "--repeats", "0", "-o", "{ws}/o"],
        "bench-warmup": ["bench", g, "--data", d, "--warmup", "-1", "-o", "{ws}/o"],
        "bench-missing-split": ["bench", g, "-b", "onnxruntime", "--data", "{ws}/h5/huge", "--split", "val",
                                "--engines", "{ws}/out-eng", "-o", "{ws}/o"],
        "export-opset-99": ["export", g, "--opset", "99", "-o", "{ws}/o"],
        "export-opset-16": ["export", g, "--opset", "16", "-o", "{ws}/o"],
        "prune-ratio-0": ["prune", g, "-r", "0", "-o", "{ws}/o"],
        "prune-ratio-1": ["prune", g, "-r", "1", "-o", "{ws}/o"],
        "prune-ratio-nan": ["prune", g, "-r", "nan", "-o", "{ws}/o"],
        "prune-round-to": ["prune", g, "--round-to", "0", "-o", "{ws}/o"],
        "reconstruct-batch": ["reconstruct", g, f"{d}/test", "--batch-size", "0", "-o", "{ws}/o"],
        "data-seed": ["data", "--root", "{ws}/o", "--seed", "-1"],
        "import-empty": ["import", "{ws}/import/empty.pt", "-o", "{ws}/o.safetensors"],
        "import-text": ["import", "{ws}/import/text.pt", "-o", "{ws}/o.safetensors"],
        "import-list": ["import", "{ws}/import/list.pt", "-o", "{ws}/o.safetensors"],
        "import-empty-dict": ["import", "{ws}/import/emptydict.pt", "-o", "{ws}/o.safetensors"],
        "import-scalar": ["import", "{ws}/import/scalar.pt", "-o", "{ws}/o.safetensors"],
        "import-int-keys": ["import", "{ws}/import/intkeys.pt", "-o", "{ws}/o.safetensors"],
        "import-pickled-code": ["import", "{ws}/import/pickled.pt", "-o", "{ws}/o.safetensors"],
        "import-missing": ["import", "{ws}/import/none.pt", "-o", "{ws}/o.safetensors"],
    }.items():
        add(f"option-{name}", args, "")
    return cases


@pytest.mark.parametrize("args, match", _cases())
def test_hostile_input_fails_cleanly_and_changes_nothing(ws, args, match):
    args = [a.replace("{ws}", str(ws)) for a in args]
    before = _snapshot(ws)
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    assert result.output.count("error:") == 1, result.output
    assert match in err, err
    assert _snapshot(ws) == before, "the command created, changed or removed files"


def test_error_lines_show_user_text_as_written(ws):
    """A path or value with brackets comes back verbatim in the error line (not read as markup)."""
    result = runner.invoke(app, ["eval", str(ws / "[run 3]" / "best.safetensors")])
    assert result.exit_code == 1 and "[run 3]" in result.stderr, result.stderr


def test_export_bound_to_its_checkpoint(ws):
    """A manifest exported from another checkpoint is refused by the deployment itself, and `bench`
    exports again rather than run another model's priors under this one's label."""
    from spade_deploy.checkpoint import load_model
    from spade_deploy.paths import sha256_file
    from spade_deploy.deploy.runtime import deploy

    model, _ = load_model(ws / "good.safetensors")
    mpath = ws / "engines" / "good.manifest.json"
    deploy(model, "onnxruntime", mpath, checkpoint_sha256=sha256_file(ws / "good.safetensors"))
    with pytest.raises(SpadeError, match="another checkpoint"):
        deploy(model, "onnxruntime", mpath, checkpoint_sha256=sha256_file(ws / "pruned" / "good.pruned-0.4.safetensors"))


@pytest.mark.parametrize("args", [
    ["import", "{ws}/import/pickled.pt", "-o", "{ws}/o.safetensors"],
    ["eval", "{ws}/bad/shapes-36TB.safetensors", "--data", "{ws}/data"],
    ["eval", "{ws}/good.safetensors", "--data", "{ws}/h5/huge"],
    ["finetune", "{ws}/run/best.safetensors", "-s", "supervised", "--data", "{ws}/data", "-o", "{ws}/run"],
], ids=["pickled-import", "36TB-checkpoint", "huge-hdf5", "finetune-onto-input"])
def test_hostile_input_in_a_real_process(ws, args):
    """The installed `spade` in its own process: exit 1, one stderr line, nothing on stdout (no
    warning or progress output around the error)."""
    import subprocess
    import sys

    before = _snapshot(ws)
    proc = subprocess.run([str(Path(sys.executable).parent / "spade"), *(a.replace("{ws}", str(ws)) for a in args)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert proc.stdout == ""
    assert _snapshot(ws) == before


# ------------------------------------------------------------------------------------------------
# Where disks fill and runs get killed: a file-size limit (RLIMIT_FSIZE, `ulimit -f`) makes every
# write past it fail with EFBIG ("File too large"), as a full disk fails with ENOSPC, at the same
# byte on any machine.
def _spade_env(tmp_path: Path) -> dict[str, str]:
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(cache), "COLUMNS": "200"}


def _file_limit(nbytes: int):
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return limit


def test_full_disk_during_prune_is_one_error_line_and_leaves_nothing(tmp_path):
    """`spade prune` whose checkpoint cannot be written whole (64 KiB file-size limit; the pruned
    small DEQ is about 140 KB): one `error:` line naming the file and the cause, exit 1, no
    traceback, no file (partial or temporary) left in the output folder."""
    import subprocess
    import sys

    from spade_deploy.models import get_entry

    spade = str(Path(sys.executable).parent / "spade")
    out = tmp_path / "out"
    proc = subprocess.run([spade, "prune", str(get_entry("deq").bundled_path("small")), "-r", "0.4", "-o", str(out)],
                          capture_output=True, text=True, timeout=300, env=_spade_env(tmp_path),
                          preexec_fn=_file_limit(64 * 1024))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    target = out / "deq-small.pruned-0.4.safetensors"
    assert f"cannot write {target}" in lines[0] and "File too large" in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_kill_inside_a_checkpoint_write_leaves_only_temps_resume_removes(tiny_dataset, tmp_path):
    """`spade train` killed in the middle of writing last.safetensors (SIGXFSZ at its default action,
    kill the process, at a file-size limit between best's and last's sizes: the kill lands inside the
    write's bytes, at the same byte on any machine) leaves beside the run's files only temporaries the
    toolchain recognises as the run's (safetensors' own writer would leave a ``.tmpXXXXXX``), and
    `--resume` removes them and finishes the run: the folder then holds the run's files alone."""
    import signal
    import subprocess
    import sys

    from spade_deploy.io import is_temp_of

    spade = str(Path(sys.executable).parent / "spade")
    run = tmp_path / "run"
    env = _spade_env(tmp_path)
    train = ["train", "--preset", "tiny", "--data", str(tiny_dataset.root), "--epochs", "1", "--batch-size", "4",
             "--pretrain-steps", "0", "--train-max-iter", "5", "-o", str(run)]
    # a first run fills the coil-map cache (its ESPIRiT maps are larger than the limit)
    first = subprocess.run([spade, *train[:-1], str(tmp_path / "first")], capture_output=True, text=True,
                           timeout=300, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    # the real `spade` script, with SIGXFSZ put back to its default (Python ignores it at start)
    launch = ("import runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
              f"sys.argv = {[spade, *train]!r}; runpy.run_path({spade!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", launch], capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=_file_limit(96 * 1024))  # tiny DEQ: best ~52 KB, last ~154 KB
    assert proc.returncode == -signal.SIGXFSZ, proc.stdout + proc.stderr
    run_files = ("best.safetensors", "last.safetensors", "history.json")
    left = sorted(p.name for p in run.iterdir())
    temps = [n for n in left if n not in run_files]
    assert temps and "last.safetensors" not in left, left  # killed inside last's write
    assert all(any(is_temp_of(n, f) for f in run_files) for n in temps), left
    proc = subprocess.run([spade, *train, "--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in run.iterdir()) == sorted(run_files)
