"""DICOM files of MRD images (``spade reconstruct --format dicom``; pydicom).

One MR Image Storage file per image, explicit VR little endian, in a folder per series. Geometry
from the image header (patient coordinates, mm, as ISMRMRD and DICOM share them):

* ``Rows`` / ``Columns``: the image's ``y`` / ``x`` matrix; ``PixelSpacing`` [row spacing, column
  spacing] = [``fov_y / y``, ``fov_x / x``]; ``SliceThickness`` the field of view's ``z``;
* ``ImageOrientationPatient`` = ``read_dir`` (along a row: columns increase along the readout),
  ``phase_dir`` (down a column);
* ``ImagePositionPatient``: the centre of the first pixel. The header's ``position`` is the
  centre of the field of view, the pixel the centred FFT puts at index ``(x // 2, y // 2)``, so
  ``position - (x // 2) * dx * read_dir - (y // 2) * dy * phase_dir``;
* ``SliceLocation``: ``position . slice_dir``.

Pixels are 12-bit unsigned: one volume's images share one ``RescaleSlope`` (its largest magnitude
is 4095), so a viewer's window holds for the whole series; ``value = RescaleSlope * pixel``. UIDs
are new for each run (a reconstruction is a new series), under pydicom's UID root; study and frame
of reference UIDs are the header's where it states them.
"""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import numpy as np

from ..errors import SpadeError
from .images import UINT16_TOP, image_magnitude


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("spade-deploy")
    except PackageNotFoundError:  # pragma: no cover - source tree without install
        return "unknown"


def geometry(image: ismrmrd.Image) -> dict:
    """The DICOM geometry attributes of an MRD image (see the module docstring)."""
    nx, ny = int(image.matrix_size[0]), int(image.matrix_size[1])
    fov = [float(v) for v in image.field_of_view]
    dx, dy = fov[0] / nx, fov[1] / ny
    read = np.asarray(image.read_dir[:], dtype=np.float64)
    phase = np.asarray(image.phase_dir[:], dtype=np.float64)
    slice_dir = np.asarray(image.slice_dir[:], dtype=np.float64)
    position = np.asarray(image.position[:], dtype=np.float64)
    first = position - (nx // 2) * dx * read - (ny // 2) * dy * phase
    return {
        "Rows": ny,
        "Columns": nx,
        "PixelSpacing": [dy, dx],
        "SliceThickness": fov[2],
        "ImageOrientationPatient": [*read.tolist(), *phase.tolist()],
        "ImagePositionPatient": first.tolist(),
        "SliceLocation": float(position @ slice_dir),
    }


def write_series(folder: str | Path, images: list[ismrmrd.Image], header: ismrmrd.xsd.ismrmrdHeader | None = None,
                 series_description: str = "SPADE reconstruction") -> list[Path]:
    """Write ``images`` (one volume, in order) as ``folder/IM_0001.dcm``, … ; returns the files."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    if not images:
        raise SpadeError("no images to write as DICOM")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mags = [image_magnitude(img).T for img in images]  # (rows = y, columns = x)
    top = max(float(m.max()) for m in mags)
    slope = top / UINT16_TOP if top > 0 else 1.0
    study = getattr(getattr(header, "studyInformation", None), "studyInstanceUID", None) or generate_uid()
    measurement = getattr(header, "measurementInformation", None)
    frame = getattr(measurement, "frameOfReferenceUID", None) or generate_uid()
    series = generate_uid()
    subject = getattr(header, "subjectInformation", None)
    system = getattr(header, "acquisitionSystemInformation", None)
    sequence = getattr(header, "sequenceParameters", None)
    field_t = getattr(system, "systemFieldStrength_T", None)
    written = []
    for i, (img, mag) in enumerate(zip(images, mags)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.FrameOfReferenceUID = frame
        ds.Modality = "MR"
        ds.PatientName = getattr(subject, "patientName", None) or ""
        ds.PatientID = getattr(subject, "patientID", None) or ""
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
        ds.Manufacturer = getattr(system, "systemVendor", None) or ""
        ds.SoftwareVersions = f"spade-deploy {_version()}"
        ds.SeriesNumber = int(img.image_series_index)
        ds.SeriesDescription = series_description
        ds.InstanceNumber = int(img.image_index)
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["DERIVED", "PRIMARY", "M", "SPADE"]
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = float(sequence.TR[0]) if sequence is not None and sequence.TR else ""
        ds.EchoTime = float(sequence.TE[0]) if sequence is not None and sequence.TE else ""
        ds.EchoTrainLength = ""
        if field_t:
            ds.MagneticFieldStrength = float(field_t)
        for key, value in geometry(img).items():
            setattr(ds, key, value)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleSlope = f"{slope:.10g}"
        ds.RescaleIntercept = "0"
        ds.RescaleType = "US"
        ds.WindowCenter = f"{top / 2:.6g}"
        ds.WindowWidth = f"{top:.6g}" if top > 0 else "1"
        ds.ImageComments = "; ".join(f"{k}={img.meta[k]}" for k in ("SpadeModel", "SpadeIterations", "SpadeConverged")
                                     if k in img.meta)
        pixels = np.clip(np.rint(mag / slope), 0, UINT16_TOP).astype(np.uint16)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        path = folder / f"IM_{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written
