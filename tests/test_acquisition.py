"""Acquisition-only reconstruction: coil maps from the ACS block of the mask used, nothing outside
the mask reaching any reconstruction, and `spade eval` equal to fastMRI's evaluate() on
`spade reconstruct`'s output for files of different sizes, coil counts and readout oversampling."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spade_deploy.mri import coilmaps as CM
from spade_deploy.mri import acquisition, reader
from spade_deploy.checkpoint import save_model
from spade_deploy.errors import SpadeError
from spade_deploy.models import build_model
from spade_deploy.mri.physics import equispaced_mask, fft2c, ifft2c, rss
from spade_deploy.mri.reconstruct import reconstruct_files
from spade_deploy.mri.task import MRITask
from spade_deploy.tasks import ShapeBatchSampler
from spade_deploy.train import evaluate

from cli.main import app

runner = CliRunner()
NS = "http://www.ismrm.org/ISMRMRD"


def _header(encoded: tuple[int, int], recon: tuple[int, int]) -> bytes:
    space = "<matrixSize><x>{}</x><y>{}</y><z>1</z></matrixSize>"
    return np.bytes_(
        f'<?xml version="1.0"?><ismrmrdHeader xmlns="{NS}"><encoding>'
        f"<encodedSpace>{space.format(*encoded)}</encodedSpace><reconSpace>{space.format(*recon)}</reconSpace>"
        "</encoding></ismrmrdHeader>"
    )


def _scalar(x) -> float:
    return float(np.asarray(x).reshape(-1)[0])


def _test_file(tiny_dataset) -> Path:
    return tiny_dataset.root / "test" / tiny_dataset.splits["test"].files[0]


def _models():
    torch.manual_seed(0)
    return {name: build_model(name, preset="tiny").eval() for name in ("deq", "varnet", "e2e-varnet")}


# ------------------------------------------------------------------------------------------------
# ESPIRiT on the ACS block
def test_maps_from_the_acs_block_match_the_true_maps_and_keep_the_operator_non_expansive(tiny_dataset):
    with h5py.File(_test_file(tiny_dataset)) as f:
        k, true, target = f["kspace"][0], f["sens_maps"][0], f["reconstruction_rss"][0]
    w = k.shape[-1]
    acs = CM.centre_block(w, 0.08)  # 4 of 48 columns: the only fully sampled data of an acceleration-6 scan
    assert acs[1] - acs[0] == 4
    mask = equispaced_mask(w, 0.08, 6, seed=3)
    assert mask[acs[0]:acs[1]].all()
    maps = CM.espirit_from_acs(k * mask, acs)
    assert ((np.abs(maps) ** 2).sum(0) <= 1 + 1e-5).all()
    obj = target > 0.15 * target.max()
    inner = np.abs((maps.conj() * true).sum(0))  # 1 where equal up to a phase per pixel
    assert inner[obj].mean() > 0.99
    img = ifft2c(torch.from_numpy(k)).numpy()
    est, ref = np.abs((maps.conj() * img).sum(0)), np.abs((true.conj() * img).sum(0))
    assert np.linalg.norm((est - ref)[obj]) / np.linalg.norm(ref[obj]) < 0.02


def test_narrow_acs_blocks_get_a_kernel_that_fits_and_too_narrow_ones_are_refused():
    rng = np.random.default_rng(0)
    k = (rng.standard_normal((4, 32, 128)) + 1j * rng.standard_normal((4, 32, 128))).astype(np.complex64)
    acs = CM.centre_block(128, 0.08)  # 10 lines at width 128
    assert acs == (59, 69) and CM.calibration_width((32, 128), acs) == 10
    maps = CM.espirit_from_acs(k, acs)
    assert maps.shape == k.shape and np.isfinite(maps).all() and ((np.abs(maps) ** 2).sum(0) <= 1 + 1e-5).all()
    with pytest.raises(SpadeError, match="larger --center-fraction"):
        CM.espirit_from_acs(k, (63, 66))
    assert CM.acs_run(np.r_[np.zeros(60), np.ones(8), np.zeros(60)]) == (60, 68)
    with pytest.raises(SpadeError, match="centre column"):
        CM.acs_run(np.arange(128) % 2 == 1)


def test_maps_are_cached_in_the_cache_home_keyed_by_the_acs_data(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert CM.default_cache_dir() == tmp_path / "xdg" / "spade-deploy"
    with h5py.File(_test_file(tiny_dataset)) as f:
        k = f["kspace"][0]
    w = k.shape[-1]
    est = CM.CoilMapEstimator()
    ys = [k * equispaced_mask(w, 0.08, 6, seed=s) for s in (1, 2)]
    assert not np.array_equal(ys[0], ys[1])  # two masks, one centre block: one cache entry
    first = est(ys[0], CM.centre_block(w, 0.08))
    assert est.key(ys[0], CM.centre_block(w, 0.08)) == est.key(ys[1], CM.centre_block(w, 0.08))
    assert est.computed == 1 and len(list((tmp_path / "xdg" / "spade-deploy" / "espirit").glob("*.npy"))) == 1

    import sigpy.mri.app

    def no_espirit(*a, **k):
        raise AssertionError("ESPIRiT recomputed despite the cache")

    monkeypatch.setattr(sigpy.mri.app, "EspiritCalib", no_espirit)
    again = CM.CoilMapEstimator()(ys[1], CM.centre_block(w, 0.08))
    np.testing.assert_array_equal(again, first)
    with pytest.raises(AssertionError, match="recomputed"):  # other data in the ACS block: other maps
        CM.CoilMapEstimator()(ys[1] * 2, CM.centre_block(w, 0.08))
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: another entry
        CM.CoilMapEstimator(params=CM.EspiritParams(thresh=0.05))(ys[1], CM.centre_block(w, 0.08))


# ------------------------------------------------------------------------------------------------
# the leak test
def _junk_outside_mask(folder: Path, acceleration: int, cf: float) -> None:
    """Replace k-space outside each file's mask (its own, else fastMRI's per-file mask) and the
    file's sens_maps by junk: nothing of it may change a reconstruction."""
    rng = np.random.default_rng(1)
    for path in folder.glob("*.h5"):
        with h5py.File(path, "a") as f:
            k = f["kspace"][()]
            w = k.shape[-1]
            mask = f["mask"][()] if "mask" in f else equispaced_mask(w, cf, acceleration, seed=acquisition.fastmri_seed(path.name))
            junk = (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)) * 10 * np.abs(k).max()
            k[..., mask == 0] = junk[..., mask == 0]
            f["kspace"][...] = k.astype(np.complex64)
            f["sens_maps"][...] = junk.astype(np.complex64)


def test_nothing_outside_the_mask_reaches_any_reconstruction(tiny_dataset, tmp_path):
    clean = tmp_path / "clean"
    clean.mkdir()
    src = _test_file(tiny_dataset)
    shutil.copy(src, clean / src.name)
    with h5py.File(src) as f:  # a file that arrives undersampled, with its mask
        k = f["kspace"][()]
        mask = equispaced_mask(k.shape[-1], 0.1, 4, seed=7)
        with h5py.File(clean / "acquired.h5", "w") as g:
            for key in ("reconstruction_rss", "sens_maps", "ismrmrd_header"):
                g[key] = f[key][()]
            g["kspace"] = (k * mask).astype(np.complex64)
            g["mask"] = mask
    junk = tmp_path / "junk"
    shutil.copytree(clean, junk)
    _junk_outside_mask(junk, 6, 0.08)
    with h5py.File(clean / src.name) as a, h5py.File(junk / src.name) as b:
        assert np.abs(a["kspace"][()] - b["kspace"][()]).max() > 1.0  # the perturbation is real

    cache = tmp_path / "cache"
    # training batches: with the test measurements' own masks (school / self-supervised
    # fine-tuning) nothing changes; with fresh random masks (training on fully sampled data) the
    # measurements differ, but the maps still come from the ACS block alone
    from spade_deploy.mri.acquisition import eval_seeds, make_batch

    for fixed in (True, False):
        batches = []
        for folder in (clean, junk):
            ds = reader.SliceDataset(folder, cache_dir=cache)
            items = reader.collate([ds[i] for i in range(len(ds))])
            np.random.seed(0)
            batches.append(make_batch(items, 6, 0.08, eval_seeds(items) if fixed else None))
        torch.testing.assert_close(batches[0].physics.smaps, batches[1].physics.smaps, rtol=0, atol=0)
        torch.testing.assert_close(batches[0].physics.mask, batches[1].physics.mask, rtol=0, atol=0)
        if fixed:
            torch.testing.assert_close(batches[0].y, batches[1].y, rtol=0, atol=0)

    for name, model in _models().items():
        outs = {}
        for tag, folder in (("clean", clean), ("junk", junk)):
            reconstruct_files(model, folder, tmp_path / f"{name}-{tag}", 6, 0.08, batch_size=2, cache_dir=cache)
            ev = evaluate(model, reader.SliceDataset(folder, cache_dir=cache), MRITask(6, 0.08), batch_size=3)
            outs[tag] = ev
        for fname in (src.name, "acquired.h5"):
            with h5py.File(tmp_path / f"{name}-clean" / fname) as a, h5py.File(tmp_path / f"{name}-junk" / fname) as b:
                np.testing.assert_array_equal(a["reconstruction"][()], b["reconstruction"][()], err_msg=f"{name} {fname}")
        for field in ("psnr", "ssim", "nmse", "psnr_zero_filled", "ssim_zero_filled", "mean_iterations"):
            assert getattr(outs["clean"], field) == getattr(outs["junk"], field), (name, field)


# ------------------------------------------------------------------------------------------------
# spade eval == fastMRI's evaluate() on spade reconstruct's output
def _three_sizes(tiny_dataset, root: Path) -> Path:
    """Three volumes: 48x48 with 8 coils, 44x32 with 4 coils (fastMRI crops it to 32x32), and a
    96x48 k-space with 2x readout oversampling whose header's recon size is 48x48."""
    folder = root / "test"
    folder.mkdir(parents=True)
    with h5py.File(_test_file(tiny_dataset)) as f:
        k = f["kspace"][()]
    coil = ifft2c(torch.from_numpy(k))  # (S, 8, 48, 48)

    def write(name, images, recon):
        kspace = fft2c(images).numpy().astype(np.complex64)
        target = rss(images[..., (images.shape[-2] - recon[0]) // 2:][..., : recon[0], :], dim=1).numpy()
        with h5py.File(folder / name, "w") as f:
            f["kspace"] = kspace
            f["reconstruction_rss"] = target.astype(np.float32)
            f["ismrmrd_header"] = _header(tuple(kspace.shape[-2:]), recon)
            f.attrs["max"] = float(target.max())

    write("a_48.h5", coil, (48, 48))
    write("b_44x32.h5", coil[:, :4, 2:46, 8:40], (44, 32))
    padded = torch.zeros(coil.shape[0], 8, 96, 48, dtype=coil.dtype)
    padded[..., 24:72, :] = coil
    write("c_oversampled.h5", padded, (48, 48))
    return folder


@pytest.mark.parametrize("model", ["deq", "varnet"])
def test_spade_eval_equals_fastmri_evaluate_on_reconstruct_output(tiny_dataset, tmp_path, model):
    from fastmri.evaluate import evaluate as fastmri_evaluate

    root = tmp_path / "data"
    folder = _three_sizes(tiny_dataset, root)
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / f"{model}.safetensors", build_model(model, preset="tiny"))
    opts = ["-a", "6", "--center-fraction", "0.12", "--cache-dir", str(tmp_path / "cache")]
    rec = tmp_path / "rec"
    # the same engine as `spade eval` (PyTorch): this untrained model stops on its iteration cap,
    # where engines that agree to 1e-6 per call drift apart over 100 iterations
    result = runner.invoke(app, ["reconstruct", str(ckpt), str(folder), "-o", str(rec), "-b", "torch", *opts])
    assert result.exit_code == 0, result.output
    shapes = {}
    for p in sorted(rec.glob("*.h5")):
        with h5py.File(p) as f:
            shapes[p.name] = f["reconstruction"].shape[1:]
    assert shapes == {"a_48.h5": (48, 48), "b_44x32.h5": (44, 32), "c_oversampled.h5": (48, 48)}
    result = runner.invoke(app, ["eval", str(ckpt), "--data", str(root), "--batch-size", "2",
                                 "--json", str(tmp_path / "eval.json"), *opts])
    assert result.exit_code == 0, result.output
    ours = json.loads((tmp_path / "eval.json").read_text())
    assert ours["reference"] == "reconstruction_rss" and ours["n_slices"] == 3 * 2

    theirs = fastmri_evaluate(argparse.Namespace(target_path=folder, predictions_path=rec, acquisition=None,
                                                 acceleration=None), "reconstruction_rss").means()
    assert ours["psnr"] == pytest.approx(_scalar(theirs["PSNR"]), abs=0.01)
    assert ours["ssim"] == pytest.approx(_scalar(theirs["SSIM"]), abs=1e-3)
    assert ours["nmse"] == pytest.approx(_scalar(theirs["NMSE"]), rel=1e-3)
    # the data folder holds the three volumes and nothing else (no cache beside the data)
    assert sorted(p.name for p in folder.iterdir()) == ["a_48.h5", "b_44x32.h5", "c_oversampled.h5"]

    # zero-filled: fastMRI's RSS of the zero-filled k-space, in the same crop
    zf = tmp_path / "zf"
    zf.mkdir()
    for p in folder.glob("*.h5"):
        with h5py.File(p) as f:
            k = torch.from_numpy(f["kspace"][()])
            recon = tuple(int(v) for v in (f["reconstruction_rss"].shape[1:]))
        mask = torch.from_numpy(equispaced_mask(k.shape[-1], 0.12, 6, seed=acquisition.fastmri_seed(p.name)))
        img = rss(ifft2c(k * mask), dim=1)
        top = (img.shape[-2] - recon[0]) // 2
        left = (img.shape[-1] - recon[1]) // 2
        with h5py.File(zf / p.name, "w") as g:
            g["reconstruction"] = img[..., top:top + recon[0], left:left + recon[1]].numpy()
    theirs_zf = fastmri_evaluate(argparse.Namespace(target_path=folder, predictions_path=zf, acquisition=None,
                                                    acceleration=None), "reconstruction_rss").means()
    assert ours["psnr_zero_filled"] == pytest.approx(_scalar(theirs_zf["PSNR"]), abs=0.01)
    assert ours["ssim_zero_filled"] == pytest.approx(_scalar(theirs_zf["SSIM"]), abs=1e-3)

    full = tmp_path / "full"
    result = runner.invoke(app, ["reconstruct", str(ckpt), str(folder / "c_oversampled.h5"), "-o", str(full),
                                 "--full-fov", *opts])
    assert result.exit_code == 0, result.output
    with h5py.File(full / "c_oversampled.h5") as f:
        assert f["reconstruction"].shape == (2, 96, 48)


# ------------------------------------------------------------------------------------------------
# slices that did not converge
def test_slices_on_the_iteration_cap_are_named_and_recorded(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    net = build_model("deq", preset="tiny")
    ckpt = save_model(tmp_path / "deq.safetensors", net)
    fname = tiny_dataset.splits["test"].files[0]
    result = runner.invoke(app, ["eval", str(ckpt), "--data", str(tiny_dataset.root), "--max-iter", "2",
                                 "--tol", "1e-12", "--json", str(tmp_path / "e.json")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # the console wraps long lines
    assert f"2 slices hit the iteration cap: {fname}:0, {fname}:1" in said
    assert json.loads((tmp_path / "e.json").read_text())["not_converged"] == [f"{fname}:0", f"{fname}:1"]

    # What each file records is the solver's stop: on the cap, the cap's count of iterations with a
    # last step above the tolerance; on the tolerance, before the cap with a last step below it. Its
    # residual is the last relative step: a solve stopped on the tolerance after one iteration and
    # one capped at one iteration record the same first step.
    recorded = {}
    for cap, tol, converged in ((2, 1e-12, False), (1, 1e-12, False), (100, 0.5, True)):
        net.solver_cfg = dataclasses.replace(net.solver_cfg, max_iter=cap, tol=tol)
        out = tmp_path / f"rec{cap}"
        res = reconstruct_files(net, tiny_dataset.root / "test", out, 6, 0.08)
        with h5py.File(out / fname) as f:
            assert f["converged"][()].tolist() == [converged] * 2
            iterations, residual = f["iterations"][()].tolist(), f["final_residual"][()].tolist()
        if converged:
            assert all(n < cap for n in iterations) and all(r < tol for r in residual), (iterations, residual)
        else:
            assert iterations == [cap, cap] and all(r > tol for r in residual), (iterations, residual)
        assert res.not_converged == ([] if converged else [f"{fname}:0", f"{fname}:1"])
        recorded[cap] = iterations, residual
    assert recorded[100][0] == [1, 1] and recorded[100][1] == pytest.approx(recorded[1][1], rel=1e-6)
    assert recorded[2][1] != pytest.approx(recorded[1][1], rel=1e-3)  # the second step's, not the first's


# ------------------------------------------------------------------------------------------------
# folders of mixed sizes
def test_shape_batches_never_mix_sizes_and_are_reproducible(tiny_dataset, tmp_path):
    root = tmp_path / "data"
    folder = _three_sizes(tiny_dataset, root)
    ds = reader.SliceDataset(folder)
    g = torch.Generator().manual_seed(3)
    sampler = ShapeBatchSampler(ds, 4, shuffle=True, generator=g)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 and sorted(i for b in batches for i in b) == list(range(6))
    assert all(len({ds.group_key(i) for i in b}) == 1 for b in batches)
    again = list(ShapeBatchSampler(ds, 4, shuffle=True, generator=torch.Generator().manual_seed(3)))
    assert again == batches
    assert list(ShapeBatchSampler(ds, 4)) == [[0, 1], [2, 3], [4, 5]]  # in order without shuffling


def test_finetune_on_a_folder_of_mixed_sizes_and_coil_counts(tiny_dataset, tmp_path):
    root = tmp_path / "data"
    _three_sizes(tiny_dataset, root)
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "v.safetensors", build_model("varnet", preset="tiny"))
    result = runner.invoke(app, ["finetune", str(ckpt), "-s", "self-supervised", "--data", str(root), "--epochs", "1",
                                 "--batch-size", "2", "-a", "6", "--center-fraction", "0.12", "-o", str(tmp_path / "ft"),
                                 "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ft" / "best.safetensors").exists()
    assert sorted(p.name for p in (root / "test").iterdir()) == ["a_48.h5", "b_44x32.h5", "c_oversampled.h5"]
