"""MRD images of reconstructions, and MRD image files (``spade serve`` sends these images;
``spade send`` and ``spade reconstruct --format mrd`` write these files, :mod:`~spade_deploy.mri.volumes`).

An image is the magnitude of one slice's reconstruction, cropped to the recon-space matrix
(``full_fov``: the encoded one), as an ``ismrmrd.Image`` of one channel: pixel array ``(y, x)``,
``x`` along the readout (``read_dir``), ``y`` along the phase encoding (``phase_dir``); the
fastMRI-layout reconstruction ``(x, y)`` transposed. Its header comes from the acquisition nearest
the slice's k-space centre (``ImageHeader.from_acquisition``: position, directions, table
position, counters, time stamps), with ``image_type`` magnitude, ``field_of_view`` the pixels'
extent (encoded field of view / encoded matrix per pixel; ``z`` the slice thickness),
``image_series_index`` and ``image_index`` (1-based, in the order the slices were reconstructed).

Pixels (``pixels``): ``uint16`` (default; what scanner consoles store) scales each image so its
largest value is 4095 and records the factor back to the reconstruction's units in the meta
attribute ``RescaleSlope`` (``value = RescaleSlope * pixel``, ``RescaleIntercept`` 0: the
DICOM meaning FIRE gives them); ``float32`` sends the magnitude itself. Meta attributes, beside
``DataRole`` / ``ImageProcessingHistory`` / ``Keep_image_geometry``: ``SpadeModel``,
``SpadeCheckpointSHA256``, ``SpadeEngine``, and per slice ``SpadeIterations``, ``SpadeConverged``,
``SpadeResidual`` (fixed-point models) and, from the server, ``SpadeLatencyMs`` (the slice's last
line received to its image made), ``SpadeMapsMs`` (ESPIRiT) and ``SpadeReconMs`` (the deployed
loop).
"""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import numpy as np

from ..errors import SpadeError
from ..io import atomic_path
from .ismrmrd_raw import Encoding

PIXELS = ("uint16", "float32")
UINT16_TOP = 4095  # 12-bit, as MR images are stored


def image_fov(encoding: Encoding, size: tuple[int, int]) -> tuple[float, float, float]:
    """The extent in mm of ``size = (x, y)`` pixels of the reconstruction grid (the encoded
    field of view over the encoded matrix per pixel; the recon space's where the encoded one is
    not stated) and the slice thickness."""
    spacing = []
    for i in (0, 1):
        if encoding.encoded_fov[i] > 0:
            spacing.append(encoding.encoded_fov[i] / encoding.encoded[i])
        else:
            spacing.append(encoding.recon_fov[i] / encoding.recon[i])
    return size[0] * spacing[0], size[1] * spacing[1], encoding.encoded_fov[2] or encoding.recon_fov[2]


def make_image(magnitude: np.ndarray, reference, encoding: Encoding, index: int, series: int = 1,
               pixels: str = "uint16", meta: dict | None = None) -> ismrmrd.Image:
    """The MRD image of one slice's magnitude ``(x, y)`` (fastMRI layout, already cropped)."""
    if pixels not in PIXELS:
        raise SpadeError(f"image pixels {pixels!r} is not one of: {', '.join(PIXELS)}")
    mag = np.asarray(magnitude, dtype=np.float32)
    if mag.ndim != 2 or not np.isfinite(mag).all():
        raise SpadeError(f"an image must be a finite 2-D magnitude, got shape {mag.shape}")
    arr = np.ascontiguousarray(mag.T)  # (y, x)
    attrs = {"DataRole": "Image", "ImageProcessingHistory": ["SPADE"], "Keep_image_geometry": "1"}
    if pixels == "uint16":
        top = float(arr.max())
        slope = top / UINT16_TOP if top > 0 else 1.0
        data = np.clip(np.rint(arr / slope), 0, UINT16_TOP).astype(np.uint16)
        attrs.update(RescaleSlope=repr(slope), RescaleIntercept="0")
    else:
        data = arr
    img = ismrmrd.Image.from_array(data, acquisition=reference, image_type=ismrmrd.IMTYPE_MAGNITUDE,
                                   image_index=int(index), image_series_index=int(series),
                                   field_of_view=image_fov(encoding, (mag.shape[0], mag.shape[1])))
    attrs.update({k: (v if isinstance(v, list) else str(v)) for k, v in (meta or {}).items() if v is not None})
    img.meta = attrs
    return img


def image_magnitude(image: ismrmrd.Image) -> np.ndarray:
    """An image's magnitude in the reconstruction's units, fastMRI layout ``(x, y)``."""
    data = np.asarray(image.data, dtype=np.float64)[0, 0]
    slope = float(image.meta.get("RescaleSlope", 1.0))
    intercept = float(image.meta.get("RescaleIntercept", 0.0))
    return (data * slope + intercept).T.astype(np.float32)


def write_mrd_images(path: str | Path, xml: str | None, images: list[ismrmrd.Image], group: str = "dataset") -> Path:
    """An MRD image file, as the MRD clients write one (``/<group>/xml`` and
    ``/<group>/image_<series>/{header,attributes,data}`` through ``ismrmrd.Dataset``), written to a
    temporary file and renamed."""
    path = Path(path)
    with atomic_path(path) as tmp:
        dset = ismrmrd.Dataset(str(tmp), group, mode="w")
        try:
            if xml:
                dset.write_xml_header(xml.encode("utf-8"))
            for img in images:
                dset.append_image(f"image_{img.image_series_index}", img)
        finally:
            dset.close()
    return path


def read_mrd_images(path: str | Path, group: str = "dataset") -> tuple[str | None, list[ismrmrd.Image]]:
    """The XML header (None if absent) and every image of an MRD image file, series by series."""
    path = Path(path)
    try:
        dset = ismrmrd.Dataset(str(path), group, mode="r")
    except OSError as exc:
        raise SpadeError(f"{path} is not a readable HDF5 file ({str(exc).splitlines()[0]})") from None
    try:
        try:
            names = list(dset.list())
        except LookupError:  # no such group
            names = []
        xml = dset.read_xml_header().decode("utf-8") if "xml" in names else None
        images = []
        for name in sorted(n for n in names if n.startswith("image_")):
            images += [dset.read_image(name, i) for i in range(dset.number_of_images(name))]
    finally:
        dset.close()
    return xml, images
