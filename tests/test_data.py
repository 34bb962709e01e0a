"""The fastMRI reader, masks, ESPIRiT maps with their cache, and the embedded default dataset."""

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from fastmri.data.mri_data import SliceDataset as FastMRISliceDataset
from fastmri.data.subsample import EquispacedMaskFractionFunc

from spade_deploy.mri import acquisition, reader, simulate
from spade_deploy.errors import SpadeError
from spade_deploy.mri.physics import fft2c, ifft2c, rss


# ------------------------------------------------------------------------------------------------
# reader
def test_reader_round_trips_a_fastmri_file(make_fastmri_file):
    path, arr = make_fastmri_file(slices=3, coils=4, shape=(16, 20))
    ds = reader.SliceDataset(path, coil_maps="file")
    assert len(ds) == 3 and ds.files == [path] and ds.has_ground_truth
    for s in range(3):
        item = ds[s]
        assert item["kspace"].dtype == torch.complex64 and item["kspace"].shape == (4, 16, 20)
        np.testing.assert_array_equal(item["kspace"].numpy(), arr["kspace"][s])
        np.testing.assert_array_equal(item["smaps"].numpy(), arr["sens_maps"][s])
        np.testing.assert_array_equal(item["target"].numpy(), arr["reconstruction_rss"][s])
        assert item["target"].dtype == torch.float32
        assert item["has_target"] is True and item["maxval"] == 2.5
        assert item["fname"] == "vol.h5" and item["slice"] == s
    assert ds[-1]["slice"] == 2
    with pytest.raises(IndexError):
        ds[3]


def test_folder_indexes_every_slice_of_every_file_in_order(make_fastmri_file, tmp_path):
    folder = tmp_path / "split"
    make_fastmri_file("b.h5", slices=2, folder=folder, seed=1)
    make_fastmri_file("a.h5", slices=3, folder=folder, seed=2)
    (folder / "notes.txt").write_text("ignored")
    ds = reader.SliceDataset(folder)
    assert [p.name for p in ds.files] == ["a.h5", "b.h5"]
    assert [(ds[i]["fname"], ds[i]["slice"]) for i in range(len(ds))] == [
        ("a.h5", 0), ("a.h5", 1), ("a.h5", 2), ("b.h5", 0), ("b.h5", 1)
    ]


def test_file_without_ground_truth(make_fastmri_file):
    path, arr = make_fastmri_file(rss=False, max_attr=False)
    ds = reader.SliceDataset(path)
    assert not ds.has_ground_truth
    item = ds[1]
    assert item["has_target"] is False
    expected = rss(ifft2c(torch.from_numpy(arr["kspace"][1])), dim=0)
    torch.testing.assert_close(item["target"], expected)
    volume_max = max(float(rss(ifft2c(torch.from_numpy(k)), dim=0).max()) for k in arr["kspace"])
    assert item["maxval"] == pytest.approx(volume_max, rel=1e-6)


def test_maxval_without_attribute_is_the_volume_maximum(make_fastmri_file):
    path, arr = make_fastmri_file(max_attr=False)
    assert reader.SliceDataset(path)[0]["maxval"] == pytest.approx(float(arr["reconstruction_rss"].max()))


def _bad(make, tmp_path, case):
    rng = np.random.default_rng(0)
    if case == "missing":
        return tmp_path / "nope.h5"
    if case == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if case == "not hdf5":
        p = tmp_path / "text.h5"
        p.write_text("hello")
        return p
    if case == "no kspace":
        p = tmp_path / "image.h5"
        with h5py.File(p, "w") as f:
            f["image"] = np.zeros((1, 8, 8), np.float32)
        return p
    if case == "rank":
        return make(kspace=np.zeros((4, 16, 20), np.complex64), rss=False, smaps=False)[0]
    if case == "real":
        return make(kspace=np.zeros((2, 4, 16, 20), np.float32), rss=False, smaps=False)[0]
    if case == "sens_maps":
        return make(sens_maps=np.ones((3, 4, 16, 19), np.complex64))[0]
    if case == "rss shape":
        return make(reconstruction_rss=np.ones((2, 16, 20), np.float32))[0]
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case,match",
    [
        ("missing", "does not exist"),
        ("empty folder", "no .h5 files"),
        ("not hdf5", "not a readable HDF5"),
        ("no kspace", "no 'kspace'"),
        ("rank", "rank 3.*4-D"),
        ("real", "must be complex"),
        ("sens_maps", "sens_maps of shape .* does not match kspace"),
        ("rss shape", "reconstruction_rss of shape"),
    ],
)
def test_bad_input_is_a_one_line_user_error(make_fastmri_file, tmp_path, case, match):
    path = _bad(make_fastmri_file, tmp_path, case)
    with pytest.raises(SpadeError, match=match) as err:
        reader.SliceDataset(path)
    assert "\n" not in str(err.value)
    if case not in ("missing", "empty folder"):
        assert path.name in str(err.value)


@pytest.mark.parametrize("dataset,value", [("kspace", np.nan), ("kspace", np.inf), ("sens_maps", np.nan),
                                           ("reconstruction_rss", np.nan)])
def test_non_finite_values_are_reported_when_the_slice_is_read(make_fastmri_file, dataset, value):
    path, arr = make_fastmri_file()
    bad = arr[dataset].copy()
    bad[1].flat[5] = value
    with h5py.File(path, "a") as f:
        f[dataset][...] = bad
    ds = reader.SliceDataset(path, coil_maps="file" if dataset == "sens_maps" else "espirit")
    ds[0]  # other slices stay readable
    with pytest.raises(SpadeError, match=f"slice 1 of {dataset} contains NaN or inf"):
        ds[1]


def test_coil_map_source_errors(make_fastmri_file):
    path, _ = make_fastmri_file(smaps=False)
    with pytest.raises(SpadeError, match="no sens_maps"):
        reader.SliceDataset(path, coil_maps="file")
    with pytest.raises(SpadeError, match="unknown coil-map source"):
        reader.SliceDataset(path, coil_maps="sense")  # type: ignore[arg-type]


def test_collate_stacks_and_refuses_mixed_sizes(make_fastmri_file, tmp_path):
    ds = reader.SliceDataset(make_fastmri_file()[0])
    batch = reader.collate([ds[0], ds[2]])
    assert batch["kspace"].shape == (2, 4, 16, 20) and batch["smaps"] is None  # maps come from the acquisition
    assert batch["mask"] == [None, None] and batch["recon_size"] == (16, 20)
    with_file_maps = reader.SliceDataset(ds.files[0], coil_maps="file")
    assert reader.collate([with_file_maps[0], with_file_maps[1]])["smaps"].shape == (2, 4, 16, 20)
    assert batch["target"].shape == (2, 16, 20) and batch["maxval"].tolist() == [2.5, 2.5]
    assert batch["has_target"].tolist() == [True, True] and batch["slice"].tolist() == [0, 2]
    assert batch["fname"] == ["vol.h5", "vol.h5"]
    other = reader.SliceDataset(make_fastmri_file("small.h5", shape=(16, 18))[0])
    with pytest.raises(SpadeError, match="different sizes"):
        reader.collate([ds[0], other[0]])


# ------------------------------------------------------------------------------------------------
# masks and coil combination
def _consistent_batch(b=2, c=6, h=24, w=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, h, w, dtype=torch.complex64, generator=g)
    s = torch.randn(b, c, h, w, dtype=torch.complex64, generator=g)
    s = s / s.abs().pow(2).sum(1, keepdim=True).sqrt()
    return x, s, fft2c(s * x.unsqueeze(1))


def test_sense_combine_inverts_fully_sampled_normalised_coils():
    x, s, k = _consistent_batch()
    torch.testing.assert_close(acquisition.sense_combine(k, s), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acquisition.sense_combine(k[0], s[0]), x[0], rtol=1e-5, atol=1e-5)


def test_undersample_uses_fastmri_masks_and_seeds():
    x, s, k = _consistent_batch()
    names = ["file_brain_AXT2_200_6002217.h5", "sim_brain_AXT1_003.h5"]
    y, phys = acquisition.undersample(k, 6, 0.08, [acquisition.fastmri_seed(n) for n in names], smaps=s)
    assert phys.mask.shape == (2, 1, 1, 32)
    for b, name in enumerate(names):
        ref, _ = EquispacedMaskFractionFunc([0.08], [6])((1, 32, 2), seed=tuple(map(ord, name)))
        np.testing.assert_array_equal(phys.mask[b].flatten().numpy(), ref.numpy().flatten())
    torch.testing.assert_close(y, phys.A(x), rtol=1e-5, atol=1e-5)
    unsampled = phys.mask.expand_as(y) == 0
    assert unsampled.any() and (y[unsampled] == 0).all()
    torch.testing.assert_close(y[~unsampled], k[~unsampled])


def test_undersample_random_offsets_follow_numpy_global_state():
    _, s, k = _consistent_batch(b=8, w=64)
    np.random.seed(3)
    _, p1 = acquisition.undersample(k, 8, 0.04, smaps=s)
    np.random.seed(3)
    _, p2 = acquisition.undersample(k, 8, 0.04, None, smaps=s)
    torch.testing.assert_close(p1.mask, p2.mask)
    assert len({tuple(m.flatten().tolist()) for m in p1.mask}) > 1  # offsets vary across the batch


def test_undersample_input_errors():
    _, s, k = _consistent_batch()
    with pytest.raises(SpadeError, match="do not match"):
        acquisition.undersample(k, 6, 0.08, smaps=s[:, :3])
    with pytest.raises(SpadeError, match="2 mask seeds"):
        acquisition.undersample(k[:1], 6, 0.08, [1, 2], smaps=s[:1])
    with pytest.raises(SpadeError, match="complex"):
        acquisition.undersample(k.real, 6, 0.08, smaps=s)


# ------------------------------------------------------------------------------------------------
# embedded default dataset
def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.h5"))}


def test_default_dataset_layout_and_physics(tiny_dataset, tiny_config):
    root = tiny_dataset.root
    assert not tiny_dataset.reused and tiny_dataset.seed == 0 and tiny_dataset.config == tiny_config
    n = tiny_config.size
    for split in simulate.SPLITS:
        vols, slices = tiny_config.counts(split)
        info = tiny_dataset.splits[split]
        assert len(info.files) == vols and info.n_slices == vols * slices
        for name in info.files:
            with h5py.File(root / split / name, "r") as f:
                k, r, s = f["kspace"][()], f["reconstruction_rss"][()], f["sens_maps"][()]
                assert k.shape == s.shape == (slices, tiny_config.n_coils, n, n) and r.shape == (slices, n, n)
                assert k.dtype == s.dtype == np.complex64 and r.dtype == np.float32
                np.testing.assert_allclose((np.abs(s) ** 2).sum(1), 1.0, atol=1e-5)
                ref = rss(ifft2c(torch.from_numpy(k)), dim=1).numpy()
                np.testing.assert_allclose(r, ref, rtol=1e-5, atol=1e-6 * ref.max())
                assert f.attrs["max"] == pytest.approx(float(r.max()))
                assert f.attrs["acquisition"] in ("AXT1", "AXT2")
                # the image is the brain, not noise: the k-space centre carries most of the energy
                centre = np.abs(k[:, :, n // 2 - 4 : n // 2 + 4, n // 2 - 4 : n // 2 + 4]) ** 2
                assert centre.sum() > 0.5 * (np.abs(k) ** 2).sum()
    manifest = json.loads((root / "dataset.json").read_text())
    assert manifest["seed"] == 0 and "McConnell Brain Imaging Centre" in manifest["source"]["licence"]


def test_default_dataset_is_read_by_fastmri_and_by_our_reader(tiny_dataset, tmp_path):
    split = tiny_dataset.root / "train"
    ref = FastMRISliceDataset(split, challenge="multicoil", dataset_cache_file=tmp_path / "cache.pkl")
    ours = reader.SliceDataset(split)
    assert len(ref) == len(ours) == tiny_dataset.splits["train"].n_slices
    kspace, mask, target, attrs, fname, s = ref[1]
    item = ours[1]
    assert (fname, s) == (item["fname"], item["slice"]) and mask is None
    np.testing.assert_array_equal(kspace, item["kspace"].numpy())
    np.testing.assert_array_equal(target, item["target"].numpy())
    assert attrs["encoding_size"] == (tiny_dataset.config.size, tiny_dataset.config.size, 1)
    assert attrs["max"] == item["maxval"]
    assert item["recon_size"] == tuple(attrs["recon_size"][:2]) and item["smaps"] is None
    with h5py.File(split / fname, "r") as f:  # the true maps only on request
        np.testing.assert_array_equal(reader.SliceDataset(split, coil_maps="file")[1]["smaps"].numpy(), f["sens_maps"][s])


def test_splits_use_different_subjects_and_separated_planes(tiny_dataset):
    planes = simulate.split_planes()
    for a in simulate.SPLITS:
        for b in simulate.SPLITS:
            if a < b:
                gap = min(abs(za - zb) for za in planes[a] for zb in planes[b])
                assert gap >= 2 * simulate.GUARD_MM + 1
    used, patients = {}, []
    for split, info in tiny_dataset.splits.items():
        for name in info.files:
            with h5py.File(tiny_dataset.root / split / name, "r") as f:
                used.setdefault(split, set()).update(f.attrs["template_planes"].tolist())
                patients.append(f.attrs["patient_id"])
        assert used[split] <= set(planes[split])
    assert len(set(patients)) == len(patients)


def test_default_dataset_is_deterministic_by_seed(tiny_dataset, tiny_config, tmp_path):
    again = simulate.build_default_dataset(tmp_path / "again", seed=0, config=tiny_config)
    assert _digests(again.root) == _digests(tiny_dataset.root)
    other = simulate.build_default_dataset(tmp_path / "other", seed=1, config=tiny_config)
    name0, name1 = tiny_dataset.splits["test"].files[0], other.splits["test"].files[0]
    with h5py.File(tiny_dataset.root / "test" / name0) as f0, h5py.File(other.root / "test" / name1) as f1:
        assert not np.allclose(f0["reconstruction_rss"][()], f1["reconstruction_rss"][()], atol=1e-2)
        assert not np.allclose(f0["sens_maps"][()], f1["sens_maps"][()], atol=1e-2)


def test_second_build_reuses_and_force_or_new_seed_rebuilds(tiny_config, tmp_path):
    root = tmp_path / "d"
    calls = []
    first = simulate.build_default_dataset(root, seed=0, config=tiny_config, progress=lambda d, t: calls.append((d, t)))
    total = sum(tiny_config.counts(s)[0] for s in simulate.SPLITS)
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*.h5")}
    second = simulate.build_default_dataset(root, seed=0, config=tiny_config)
    assert second.reused and second.splits == first.splits
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.h5")} == stamp
    forced = simulate.build_default_dataset(root, seed=0, config=tiny_config, force=True)
    assert not forced.reused and _digests(root) and set(_digests(root)) == {str(p.relative_to(root)) for p in stamp}
    reseeded = simulate.build_default_dataset(root, seed=2, config=tiny_config)
    assert not reseeded.reused and json.loads((root / "dataset.json").read_text())["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folders left behind


def test_interrupted_build_leaves_nothing_that_looks_complete(tiny_config, tmp_path):
    root = tmp_path / "d"

    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate.build_default_dataset(root, seed=0, config=tiny_config, progress=interrupt)
    assert not root.exists() and list(tmp_path.iterdir()) == []
    # an interrupted rebuild keeps the previous complete build
    simulate.build_default_dataset(root, seed=0, config=tiny_config)
    before = _digests(root)
    with pytest.raises(KeyboardInterrupt):
        simulate.build_default_dataset(root, seed=1, config=tiny_config, progress=interrupt)
    assert _digests(root) == before and json.loads((root / "dataset.json").read_text())["seed"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_builder_refuses_foreign_folders_and_bad_settings(tmp_path, tiny_config):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep")
    with pytest.raises(SpadeError, match="not a spade-deploy default dataset"):
        simulate.build_default_dataset(foreign, config=tiny_config)
    assert (foreign / "thesis.tex").read_text() == "keep"
    with pytest.raises(SpadeError, match="seed"):
        simulate.build_default_dataset(tmp_path / "x", seed=-1, config=tiny_config)
    with pytest.raises(SpadeError, match="planes"):
        simulate.build_default_dataset(tmp_path / "x", config=simulate.SimConfig(test_slices=500))
    assert not (tmp_path / "x").exists()


def test_default_data_root(monkeypatch, tmp_path):
    monkeypatch.delenv("SPADE_DATA", raising=False)
    assert simulate.default_data_root() == Path("data") / "default"
    monkeypatch.setenv("SPADE_DATA", str(tmp_path))
    assert simulate.default_data_root() == tmp_path


# ------------------------------------------------------------------------------------------------
# acquisition masks and recon size, checked when a dataset is opened
def test_recon_size_comes_from_the_header_and_bad_headers_are_refused(make_fastmri_file):
    path, _ = make_fastmri_file(shape=(32, 20))
    ns = "http://www.ismrm.org/ISMRMRD"
    with h5py.File(path, "a") as f:
        del f["ismrmrd_header"]
        f["ismrmrd_header"] = np.bytes_(
            f'<ismrmrdHeader xmlns="{ns}"><encoding><reconSpace><matrixSize><x>16</x><y>20</y></matrixSize>'
            "</reconSpace></encoding></ismrmrdHeader>")
    assert reader.SliceDataset(path)[0]["recon_size"] == (16, 20)
    with h5py.File(path, "a") as f:
        del f["ismrmrd_header"]
        f["ismrmrd_header"] = np.bytes_("<ismrmrdHeader")
    with pytest.raises(SpadeError, match="ismrmrd_header is not readable XML"):
        reader.SliceDataset(path)
    with h5py.File(path, "a") as f:
        del f["ismrmrd_header"]
    assert reader.SliceDataset(path)[0]["recon_size"] == (32, 20)  # no header: the whole image


def test_an_acquired_mask_is_used_as_acquired(make_fastmri_file):
    mask = ((np.arange(20) % 3 == 0) | (np.abs(np.arange(20) - 10) < 3)).astype(np.float32)
    path, arr = make_fastmri_file(shape=(16, 20), mask=mask)
    item = reader.SliceDataset(path)[0]
    np.testing.assert_array_equal(item["mask"].numpy(), mask)
    y, physics = acquisition.acquire(reader.collate([item]), 6, 0.08)
    np.testing.assert_array_equal(physics.mask.reshape(-1).numpy(), mask)
    np.testing.assert_array_equal(y[0].numpy(), arr["kspace"][0] * mask)
    assert ((physics.smaps.abs() ** 2).sum(1) <= 1 + 1e-5).all()


# ------------------------------------------------------------------------------------------------
# data that outgrows memory: the coil-map cache's budget, `spade maps`, maps made in loader
# workers, evaluation scored volume by volume
def _slices(root: Path):
    ds = reader.SliceDataset(root)
    return [ds[i] for i in range(len(ds))]


def test_coil_map_cache_keeps_its_budget_evicting_the_least_recently_used(tiny_dataset, tmp_path):
    from spade_deploy.mri.coilmaps import CoilMapEstimator, cache_usage, centre_block

    items = _slices(tiny_dataset.root / "train")  # 4 slices, 147,584 bytes of maps each
    acs = centre_block(items[0]["kspace"].shape[-1], 0.08)
    entry = 147_584
    est = CoilMapEstimator(tmp_path / "c", memory_bytes=0, budget=2 * entry + entry // 2)  # room for two
    maps = [est(it["kspace"].numpy(), acs) for it in items[:2]]
    folder = tmp_path / "c" / "espirit"
    older = folder / f"{est.key(items[0]['kspace'].numpy(), acs)}.npy"
    import os
    os.utime(older, (1, 1))  # slice 0's entry now the least recently used...
    fresh = CoilMapEstimator(tmp_path / "c", memory_bytes=0, budget=est.budget)
    np.testing.assert_array_equal(fresh(items[0]["kspace"].numpy(), acs), maps[0])  # ...until read again
    assert fresh.computed == 0 and older.stat().st_mtime > 1
    fresh(items[2]["kspace"].numpy(), acs)  # a third entry: slice 1's, now the oldest, goes
    usage = cache_usage(folder)
    assert usage.entries == 2 and usage.bytes <= est.budget
    kept = {p.stem for p in folder.glob("*.npy")}
    assert kept == {est.key(items[i]["kspace"].numpy(), acs) for i in (0, 2)}
    (folder / ".x.npy.abc.tmp").write_bytes(b"0")  # a temporary a killed writer left an hour ago
    os.utime(folder / ".x.npy.abc.tmp", (1, 1))
    fresh(items[3]["kspace"].numpy(), acs)
    assert not (folder / ".x.npy.abc.tmp").exists() and cache_usage(folder).bytes <= est.budget


def test_cache_budget_from_the_environment_and_bad_sizes(monkeypatch):
    from spade_deploy.mri.coilmaps import BUDGET_ENV, DEFAULT_BUDGET, cache_budget

    monkeypatch.delenv(BUDGET_ENV, raising=False)
    assert cache_budget() == DEFAULT_BUDGET
    monkeypatch.setenv(BUDGET_ENV, "1.5G")
    assert cache_budget() == int(1.5 * 2**30) and cache_budget("500M") == 500 * 2**20
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(SpadeError, match="not a size"):
        cache_budget()


def test_spade_maps_fills_the_cache_by_shards_for_what_runs_estimate(tiny_dataset, tmp_path):
    """Two shards of `spade maps` estimate together what one does, and a later run's measurements
    find every map in the cache (no ESPIRiT run)."""
    from typer.testing import CliRunner

    from cli.main import app
    from spade_deploy.mri.acquisition import make_batch

    data = tiny_dataset.root / "train"
    runner = CliRunner()
    for name, shards in (("one", [None]), ("two", ["0/2", "1/2"])):
        for shard in shards:
            res = runner.invoke(app, ["maps", str(data), "--cache-dir", str(tmp_path / name),
                                      *(["--shard", shard] if shard else [])])
            assert res.exit_code == 0, res.output
    one = sorted(p.name for p in (tmp_path / "one" / "espirit").glob("*.npy"))
    assert len(one) == 4 and sorted(p.name for p in (tmp_path / "two" / "espirit").glob("*.npy")) == one
    ds = reader.SliceDataset(data, cache_dir=tmp_path / "two")
    batch = make_batch(reader.collate([ds[i] for i in range(len(ds))]), 6, 0.08, None)  # random mask offsets
    assert ds.estimator.computed == 0 and batch.physics.smaps.shape == (4, 8, 48, 48)
    res = runner.invoke(app, ["maps", str(data), "--cache-dir", str(data / "cache")])
    assert res.exit_code == 1 and "data folder" in res.stderr and "--cache-dir" in res.stderr, res.output
    assert res.stdout == "" and not (data / "cache").exists()
    res = runner.invoke(app, ["maps", str(data), "--cache-dir", str(tmp_path / "x"), "--cache-size", "lots"])
    assert res.exit_code == 1 and res.stderr.startswith("error: --cache-size 'lots' is not a size"), res.output
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_evaluation_scores_each_volume_when_complete_and_maps_come_from_workers(tiny_dataset, tmp_path, monkeypatch):
    """`evaluate` holds one volume's arrays at a time, scores exactly as scoring every volume at
    the end did (fastMRI's evaluate() on the stacked volumes), and with loader workers the coil
    maps are estimated in the workers, not in the evaluating process."""
    from spade_deploy.models import build_model
    from spade_deploy.mri import task as mri_task
    from spade_deploy.mri.metrics import evaluate_volumes, fastmri_crop, recon_magnitude

    torch.manual_seed(0)
    model = build_model("deq", preset="tiny")
    root = tmp_path / "data"
    root.mkdir()
    for split in ("train", "test"):
        for f in (tiny_dataset.root / split).glob("*.h5"):
            (root / f.name).write_bytes(f.read_bytes())  # 3 volumes of 2 slices
    held = []
    add = mri_task._VolumeScores.add

    def spy(self, *args):
        add(self, *args)
        held.append(sum(len(v) for v in self.open.values()))

    monkeypatch.setattr(mri_task._VolumeScores, "add", spy)
    scores = {}
    for workers in (0, 2):
        t = mri_task.MRITask(6)
        t.workers = workers
        ds = t.dataset(root)
        ds.estimator.cache_dir = tmp_path / f"cache-{workers}"
        scores[workers] = t.evaluate(model, ds, batch_size=1)
        assert ds.estimator.computed == (6 if workers == 0 else 0)  # the workers estimated them
        assert len(list((tmp_path / f"cache-{workers}" / "espirit").glob("*.npy"))) == 6
    assert max(held) == 1  # a volume is scored and dropped as soon as its last slice is in
    a, b = scores[0], scores[2]
    assert (a.psnr, a.ssim, a.nmse, a.psnr_zero_filled, a.n_slices) == pytest.approx(
        (b.psnr, b.ssim, b.nmse, b.psnr_zero_filled, b.n_slices), rel=1e-6)
    # the old way: every volume's arrays kept, scored at the end
    t = mri_task.MRITask(6)
    ds = t.dataset(root)
    ds.estimator.cache_dir = tmp_path / "cache-0"
    gts, preds = {}, {}
    with torch.no_grad():
        for items in t.loader(ds, 1):
            batch = t.eval_batch(items)
            out = recon_magnitude(model(batch.y, batch.physics), batch.meta["recon_size"])
            f = batch.meta["fnames"][0]
            gts.setdefault(f, []).append(batch.target[0].numpy())
            preds.setdefault(f, []).append(out[0].numpy())
    ref = evaluate_volumes({f: fastmri_crop(np.stack(gts[f]), np.stack(preds[f])) for f in gts})
    assert (a.psnr, a.ssim, a.nmse) == pytest.approx((ref.psnr, ref.ssim, ref.nmse), rel=1e-5)
    assert a.n_slices == 6 and set(a.per_volume) == set(gts)
