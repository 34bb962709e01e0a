"""fastMRI multi-coil files as ISMRMRD raw data (``spade convert``): one acquisition per measured
line, the lines ``spade reconstruct`` would measure, calibration lines flagged, a stream for
``spade send`` or any MRD client.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import ismrmrd
import numpy as np

from .coilmaps import acs_run, centre_block
from .acquisition import fastmri_seed
from .reader import SliceDataset, acquired_mask, recon_size
from ..errors import SpadeError
from .ismrmrd_raw import default_geometry, header_for_fastmri, open_h5, put_row, write_raw
from ..paths import check_outputs
from .physics import center_fraction_for, equispaced_mask


@dataclass
class ConvertResult:
    output: Path
    slices: int
    lines_per_slice: int
    columns: int
    acceleration: float  # columns / lines
    calibration: tuple[int, int] | None  # [start, stop) of the flagged calibration lines


def sampled_lines(fname: str, width: int, file_mask: np.ndarray | None, acceleration: int | None,
                  center_fraction: float | None) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The columns ``spade reconstruct`` measures of a fastMRI file (its own ``mask``, else
    fastMRI's equispaced mask at ``acceleration`` with the file's seed, else all) and the
    calibration block among them."""
    if file_mask is not None:
        if acceleration is not None:
            raise SpadeError(f"{fname} is already undersampled (it has a mask): drop --acceleration")
        return file_mask.astype(np.float32), acs_run(file_mask)
    if acceleration is None:
        return np.ones(width, np.float32), None
    cf = center_fraction if center_fraction is not None else center_fraction_for(acceleration)
    mask = equispaced_mask(width, cf, acceleration, seed=fastmri_seed(fname))  # type: ignore[arg-type]
    return mask, centre_block(width, cf)


def fastmri_to_raw(source: str | Path, output: str | Path, acceleration: int | None = None,
                   center_fraction: float | None = None) -> ConvertResult:
    """Write the ISMRMRD raw file of a fastMRI multi-coil file (``spade convert``).

    One acquisition per measured k-space column and slice, slice after slice (``ACQ_FIRST_IN_SLICE``
    / ``ACQ_LAST_IN_SLICE``, ``ACQ_LAST_IN_MEASUREMENT`` on the last): the columns ``spade
    reconstruct`` would measure (:func:`sampled_lines`; with ``acceleration``: fastMRI's
    equispaced mask with the file's seed, the same measurements), the calibration block's lines
    flagged ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING``. Geometry: :func:`default_geometry`.
    Written to a temporary file and renamed."""
    source, output = Path(source), Path(output)
    if output.is_dir():
        raise SpadeError(f"output path {output} is a folder, expected a file")
    check_outputs(files=[output], inputs=[source], data=[source.parent])
    ds = SliceDataset(source)
    if len(ds.files) != 1 or ds.files[0] != source:
        raise SpadeError(f"{source}: convert takes one fastMRI file")
    with open_h5(source) as f:
        if "kspace" not in f:
            raise SpadeError(f"{source} has no 'kspace' dataset; not a fastMRI multi-coil file")
        kspace = f["kspace"]
        n, c, h, w = kspace.shape
        xml = None
        if "ismrmrd_header" in f:
            raw = f["ismrmrd_header"][()]
            xml = raw.decode("utf-8", "replace") if isinstance(raw, (bytes, np.bytes_)) else str(raw)
        file_mask = acquired_mask(source, f, w)
        recon = recon_size(source, f, (h, w))
        mask, calib = sampled_lines(source.name, w, file_mask, acceleration, center_fraction)
        cols = np.flatnonzero(mask)
        acc = None if calib is None else (acceleration or max(1, round(w / len(cols))))
        header = header_for_fastmri(xml, (n, c, h, w), recon, acc)
        thickness = float(header.encoding[0].encodedSpace.fieldOfView_mm.z) or 1.0
        dtype = ismrmrd.hdf5.acquisition_dtype
        table = np.empty(n * len(cols), dtype=dtype)
        counter = 0
        for s in range(n):
            slab = np.ascontiguousarray(f["kspace"][s]).astype(np.complex64, copy=False)  # (C, H, W)
            if not np.isfinite(slab).all():
                raise SpadeError(f"{source}: slice {s} of kspace contains NaN or inf values")
            geometry = default_geometry(s, n, thickness)
            for j, col in enumerate(cols):
                acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(slab[:, :, col]))
                acq.version = 1
                acq.scan_counter = counter + 1
                acq.center_sample = h // 2
                acq.position[:] = geometry.position
                acq.read_dir[:] = geometry.read_dir
                acq.phase_dir[:] = geometry.phase_dir
                acq.slice_dir[:] = geometry.slice_dir
                acq.idx.kspace_encode_step_1 = int(col)
                acq.idx.slice = s
                for ch in range(c):
                    acq.setChannelActive(ch)
                if calib is not None and calib[0] <= col < calib[1]:
                    acq.setFlag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
                if j == 0:
                    acq.setFlag(ismrmrd.ACQ_FIRST_IN_SLICE)
                if j == len(cols) - 1:
                    acq.setFlag(ismrmrd.ACQ_LAST_IN_SLICE)
                    if s == n - 1:
                        acq.setFlag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
                put_row(table, counter, acq)
                counter += 1
    write_raw(output, header, table)
    return ConvertResult(output=output, slices=n, lines_per_slice=len(cols), columns=w,
                         acceleration=w / len(cols), calibration=calib)
