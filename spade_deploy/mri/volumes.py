"""A reconstructed file as MRD images or a DICOM series (``spade reconstruct --format mrd |
dicom``): the images of :mod:`~spade_deploy.mri.images` with the geometry of the source file (a
raw file's acquisitions, or for a fastMRI file its header as ``spade convert`` writes it).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import h5py
import ismrmrd
import numpy as np

from .reader import recon_size
from .dicom import write_series
from ..errors import SpadeError
from .images import make_image, write_mrd_images
from .ismrmrd_raw import Encoding, RawFile, default_geometry, encoding_of, header_for_fastmri, header_xml, is_raw

FORMATS = ("h5", "mrd", "dicom")


@dataclass
class VolumeGeometry:
    header: ismrmrd.xsd.ismrmrdHeader
    encoding: Encoding
    references: list  # per slice: the acquisition header its image header is made from


def volume_geometry(path: str | Path) -> VolumeGeometry:
    """The header and per-slice reference acquisitions of a raw file, or for a fastMRI file its
    header as ``spade convert`` writes it and :func:`~.ismrmrd_raw.default_geometry`."""
    path = Path(path)
    with h5py.File(path, "r") as f:
        raw = "kspace" not in f and is_raw(f)
        if not raw:
            n, c, h, w = f["kspace"].shape
            xml = None
            if "ismrmrd_header" in f:
                value = f["ismrmrd_header"][()]
                xml = value.decode("utf-8", "replace") if isinstance(value, (bytes, np.bytes_)) else str(value)
            recon = recon_size(path, f, (h, w))
    if raw:
        rf = RawFile(path)
        return VolumeGeometry(rf.header, rf.encoding, rf.references)
    header = header_for_fastmri(xml, (n, c, h, w), recon, None)
    encoding = encoding_of(header)
    thickness = encoding.encoded_fov[2] or 1.0
    return VolumeGeometry(header, encoding, [default_geometry(s, n, thickness) for s in range(n)])


def output_path(fmt: str, out: Path, source: Path) -> Path:
    """Where ``spade reconstruct --format fmt`` writes the output of ``source``: the file of the
    same name (h5: fastMRI layout; mrd: MRD images), or for DICOM a folder named after it."""
    return out / source.stem if fmt == "dicom" else out / source.name


def write_volume(fmt: str, out: Path, source: Path, magnitudes: np.ndarray, per_slice: dict, meta: dict,
                 full_fov: bool = False, pixels: str = "uint16") -> Path:
    """The MRD image file or the DICOM series of one reconstructed file (slices in order)."""
    geo = volume_geometry(source)
    if len(geo.references) != len(magnitudes):
        raise SpadeError(f"{source}: {len(magnitudes)} reconstructed slices for {len(geo.references)} in the file")
    images = []
    for i, (mag, ref) in enumerate(zip(magnitudes, geo.references)):
        slice_meta = dict(meta)
        if per_slice.get("iterations"):
            slice_meta.update(SpadeIterations=int(per_slice["iterations"][i]),
                              SpadeConverged=int(bool(per_slice["converged"][i])),
                              SpadeResidual=f"{float(per_slice['final_residual'][i]):.3e}")
        images.append(make_image(mag, ref, geo.encoding, i + 1, pixels="float32" if fmt == "dicom" else pixels,
                                 meta=slice_meta))
    target = output_path(fmt, out, source)
    if fmt == "mrd":
        return write_mrd_images(target, header_xml(geo.header), images)
    if fmt == "dicom":
        with replaced_folder(target) as tmp:
            write_series(tmp, images, geo.header)
        return target
    raise SpadeError(f"unknown output format {fmt!r}; choose one of: {', '.join(FORMATS)}")


class replaced_folder:
    """A temporary folder beside ``target`` that replaces it on success (an interrupted run
    leaves the previous folder as it was)."""

    def __init__(self, target: Path):
        self.target = Path(target)

    def __enter__(self) -> Path:
        if self.target.exists() and not self.target.is_dir():
            raise SpadeError(f"output path {self.target} is a file, expected a folder")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.", suffix=".tmp", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.old-", dir=self.target.parent))
            os.replace(self.target, old / "previous")
        os.replace(self.tmp, self.target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
