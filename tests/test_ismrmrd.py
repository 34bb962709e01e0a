"""ISMRMRD raw data in, DICOM out: ``spade convert`` (fastMRI HDF5 -> ISMRMRD raw), ``spade
reconstruct`` of raw files (equal to the fastMRI file's reconstruction), ``--format dicom`` read
back with pydicom, and the rules by which acquisitions become a slice's k-space and mask."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pydicom
import pytest

from spade_deploy.mri.acquisition import fastmri_seed

from spade_deploy.mri.reader import SliceDataset
from spade_deploy.errors import SpadeError
from spade_deploy.mri.ismrmrd_raw import (RawFile, SliceAssembler, acquisition_table, acquisitions, parse_header,
                                          write_raw)
from spade_deploy.mri.physics import equispaced_mask
from spade_deploy.models import bundled_path

SPADE = str(Path(sys.executable).parent / "spade")
CKPT = bundled_path("deq", "small")
SAMPLING = ["-a", "4", "--center-fraction", "0.16"]  # 12 of 48 lines, 8 of them the calibration block


def _env(home: Path) -> dict:
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"),
            "TMPDIR": str(home / "tmp")}


def _spade(home: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([SPADE, *map(str, args)], env=_env(home), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("ismrmrd-home")


@pytest.fixture(scope="module")
def source(tiny_dataset) -> Path:
    return sorted((tiny_dataset.root / "test").glob("*.h5"))[0]


@pytest.fixture(scope="module")
def converted(source, home, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw") / "volume.raw.h5"
    proc = _spade(home, "convert", source, "-o", out, *SAMPLING)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 slices x 12 of 48 lines" in " ".join(proc.stdout.split())
    return out


@pytest.fixture(scope="module")
def reconstructions(source, converted, home, tmp_path_factory) -> Path:
    """One ``spade reconstruct`` of a folder holding the fastMRI file and its raw conversion."""
    folder = tmp_path_factory.mktemp("mixed")
    shutil.copy(source, folder / source.name)
    shutil.copy(converted, folder / converted.name)
    out = tmp_path_factory.mktemp("rec")
    proc = _spade(home, "reconstruct", CKPT, folder, "-o", out, *SAMPLING)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_convert_writes_the_measured_lines_as_ismrmrd_raw(source, converted):
    header, enc = parse_header(ismrmrd.Dataset(str(converted), "dataset", mode="r").read_xml_header())
    assert enc.encoded == (48, 48) and enc.recon == (48, 48) and enc.acceleration == 4
    assert header.encoding[0].parallelImaging.calibrationMode.value == "embedded"
    mask = equispaced_mask(48, 0.16, 4, seed=fastmri_seed(source.name))
    lines = np.flatnonzero(mask)
    with h5py.File(source, "r") as f:
        kspace = f["kspace"][()]
    dset = ismrmrd.Dataset(str(converted), "dataset", mode="r")
    try:
        acqs = [dset.read_acquisition(i) for i in range(dset.number_of_acquisitions())]
    finally:
        dset.close()
    assert len(acqs) == 2 * len(lines)
    for i, acq in enumerate(acqs):
        s, line = divmod(i, len(lines))
        assert (acq.idx.slice, acq.idx.kspace_encode_step_1) == (s, lines[line])
        assert np.array_equal(acq.data, kspace[s, :, :, lines[line]])  # (coils, readout): the column, unchanged
        calibration = 20 <= lines[line] < 28  # fastMRI's centre block of 8 of 48 columns
        assert acq.isFlagSet(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING) == calibration
        assert acq.isFlagSet(ismrmrd.ACQ_LAST_IN_SLICE) == (line == len(lines) - 1)
        assert acq.isFlagSet(ismrmrd.ACQ_LAST_IN_MEASUREMENT) == (i == len(acqs) - 1)
        assert list(acq.slice_dir) == [0, 0, 1] and acq.position[2] == pytest.approx(-2.5 + 5.0 * s)


def test_raw_file_reconstructs_to_the_fastmri_files_images(source, converted, reconstructions):
    """fastMRI HDF5 -> ISMRMRD -> spade reconstruct: the same measurements (the raw file's lines
    are the mask spade reconstruct draws for the fastMRI file), the same maps, the same images."""
    with h5py.File(reconstructions / source.name, "r") as a, h5py.File(reconstructions / converted.name, "r") as b:
        ra, rb = a["reconstruction"][()], b["reconstruction"][()]
        assert ra.shape == rb.shape == (2, 48, 48)
        assert np.abs(ra - rb).max() <= 1e-5 * ra.max()
        assert np.array_equal(a["iterations"][()], b["iterations"][()]) and b["converged"][()].all()
    item = SliceDataset(converted)[0]  # the reader hands the raw file's own mask, not a retrospective one
    assert np.array_equal(item["mask"].numpy(), equispaced_mask(48, 0.16, 4, seed=fastmri_seed(source.name)))


def test_dicom_output_opens_with_sane_geometry(converted, reconstructions, home, tmp_path):
    out = tmp_path / "dicom"
    proc = _spade(home, "reconstruct", CKPT, converted, "-o", out, "--format", "dicom")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted((out / converted.stem).glob("*.dcm"))
    assert [p.name for p in out.iterdir()] == [converted.stem] and len(files) == 2
    with h5py.File(reconstructions / converted.name, "r") as f:
        rec = f["reconstruction"][()]
    series = set()
    for s, path in enumerate(files):
        ds = pydicom.dcmread(path)
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        assert (ds.Rows, ds.Columns) == (48, 48) and ds.InstanceNumber == s + 1
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([5.0, 5.0])  # 240 mm over 48 pixels
        assert float(ds.SliceThickness) == pytest.approx(5.0)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        row, col = np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float)
        centre = np.array(ds.ImagePositionPatient, float) + 24 * 5.0 * row + 24 * 5.0 * col
        assert centre == pytest.approx([0.0, 0.0, -2.5 + 5.0 * s])  # the slice's position, from the acquisitions
        assert float(ds.SliceLocation) == pytest.approx(-2.5 + 5.0 * s)
        series.add(ds.SeriesInstanceUID)
        # pixels (rows = phase encoding, columns = readout) in the reconstruction's units
        values = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert ds.pixel_array.max() <= 4095
        assert np.abs(values - rec[s].T).max() <= 0.5 * float(ds.RescaleSlope) + 1e-6 * rec.max()
    assert len(series) == 1


def test_raw_file_that_does_not_fit_its_header_is_refused_on_opening(converted, tmp_path):
    """What every command reading data gets (a one-line error through the CLI's SpadeError)."""
    xml, acqs = acquisitions(converted)
    bad = write_raw(tmp_path / "bad.h5", xml.replace("<x>48</x>", "<x>64</x>", 1), acquisition_table(acqs))
    with pytest.raises(SpadeError, match=r"bad.h5: acquisition 0: k-space of the wrong size: a readout of 48 samples"):
        SliceDataset(tmp_path)


# ------------------------------------------------------------------------------------------------
# How acquisitions become a slice (in-process: the same SliceAssembler the server and the reader use)
def _header(lines: int = 8, samples: int = 6) -> str:
    space = f"<matrixSize><x>{samples}</x><y>{lines}</y><z>1</z></matrixSize><fieldOfView_mm><x>1</x><y>1</y><z>1</z></fieldOfView_mm>"
    return ('<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"><experimentalConditions>'
            "<H1resonanceFrequency_Hz>1</H1resonanceFrequency_Hz></experimentalConditions><encoding>"
            f"<encodedSpace>{space}</encodedSpace><reconSpace>{space}</reconSpace>"
            f"<encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{lines - 1}</maximum>"
            f"<center>{lines // 2}</center></kspace_encoding_step_1></encodingLimits>"
            "<trajectory>cartesian</trajectory></encoding></ismrmrdHeader>")


def _acq(line: int, value, flags=(), samples: int = 6, coils: int = 2, **head) -> ismrmrd.Acquisition:
    data = np.full((coils, samples), value, np.complex64) if np.isscalar(value) else np.asarray(value, np.complex64)
    acq = ismrmrd.Acquisition.from_array(data, **head)
    acq.idx.kspace_encode_step_1 = line
    for flag in flags:
        acq.setFlag(flag)
    return acq


def test_assembler_honours_the_acquisition_flags():
    _, enc = parse_header(_header())
    asm = SliceAssembler(enc)
    stream = [
        _acq(4, 1e9, samples=13, flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT]),  # skipped, whatever its size
        _acq(3, 1.0, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING]),
        _acq(4, 2.0, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING]),
        _acq(4, 4.0),  # a second average of line 4: averaged
        _acq(4, 1e9, flags=[ismrmrd.ACQ_IS_NAVIGATION_DATA]),
        _acq(5, 7.0, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION]),  # calibration only: fills an empty line
        _acq(3, 1e9, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION]),  # ... never an imaged one
        _acq(0, np.arange(16).reshape(2, 8) + 0j, discard_pre=1, discard_post=1, flags=[ismrmrd.ACQ_IS_REVERSE]),
        _acq(6, 5.0, flags=[ismrmrd.ACQ_LAST_IN_SLICE]),
    ]
    done = []
    for acq in stream:
        done += asm.add(acq)
    assert done == [(0, 0, 0, 0, 0)]
    raw = asm.take(done[0])
    assert raw.kspace.shape == (2, 6, 8)
    assert np.array_equal(raw.mask, [1, 0, 0, 1, 1, 1, 1, 0])
    assert np.allclose(raw.kspace[:, :, 3], 1.0) and np.allclose(raw.kspace[:, :, 4], 3.0)
    assert np.allclose(raw.kspace[:, :, 5], 7.0) and np.allclose(raw.kspace[:, :, 6], 5.0)
    # 8 samples: one discarded each side, the 6 left reversed
    assert np.allclose(raw.kspace[0, :, 0], np.arange(1, 7)[::-1]) and np.allclose(raw.kspace[1, :, 0], np.arange(9, 15)[::-1])
    assert raw.reference.idx.kspace_encode_step_1 == 4  # geometry from the line at the k-space centre
    assert raw.lines == 5 and raw.calibration_lines == 2 and asm.skipped == {"noise": 1, "navigator": 1}


@pytest.mark.parametrize("acq, reason", [
    (lambda: _acq(4, 1.0, samples=5), "k-space of the wrong size"),
    (lambda: _acq(9, 1.0), "outside the 8 encoded lines"),
    (lambda: _acq(4, 1.0, coils=2000), "channels"),
])
def test_assembler_refuses_lines_that_do_not_fit_the_header(acq, reason):
    _, enc = parse_header(_header())
    with pytest.raises(SpadeError, match=reason):
        SliceAssembler(enc).add(acq())


def test_slice_without_its_centre_line_and_bad_headers_are_refused(tmp_path):
    _, enc = parse_header(_header())
    asm = SliceAssembler(enc)
    asm.add(_acq(1, 1.0, flags=[ismrmrd.ACQ_LAST_IN_SLICE]))
    with pytest.raises(SpadeError, match="centre line"):
        asm.take((0, 0, 0, 0, 0))
    for xml, reason in [(_header().replace("cartesian", "spiral"), "only Cartesian"),
                        (_header().replace("<z>1</z></matrixSize>", "<z>8</z></matrixSize>", 1), "3-D encoding"),
                        ("<ismrmrdHeader", "not valid ISMRMRD XML")]:
        with pytest.raises(SpadeError, match=reason):
            parse_header(xml)
    path = write_raw(tmp_path / "nan.h5", _header(), acquisition_table([_acq(4, np.nan, flags=[ismrmrd.ACQ_LAST_IN_SLICE])]))
    with pytest.raises(SpadeError, match="NaN"):
        RawFile(path).read_slice(0)
