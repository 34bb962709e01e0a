"""ISMRMRD raw data: the XML header, acquisitions assembled into per-slice k-space, and raw HDF5
files (``/dataset/xml`` + ``/dataset/data``, as the ``ismrmrd`` package, the scanner converters and
the MRD streaming clients write them).

Layout. A slice's k-space is kept as fastMRI keeps it, ``(coils, H, W)``: ``H`` the readout (the
header's encodedSpace ``x``, readout oversampling included: fastMRI's 640 of a 320 recon matrix),
``W`` the phase-encoding lines (encodedSpace ``y``). The acquisition of line
``kspace_encode_step_1 = l`` fills column ``l - c + W // 2``, ``c`` the header's
``encodingLimits/kspace_encoding_step_1/center`` (``W // 2`` when absent). Its ``discard_pre`` /
``discard_post`` samples are dropped and a line flagged ``ACQ_IS_REVERSE`` is turned back; what
remains must be exactly ``H`` samples, else the data does not fit its header and is refused.

Which lines count (:class:`SliceAssembler`, the same rules for a stream and a file). Lines of the
header's first encoding only. Skipped: noise-adjust scans, navigators, phase-correction lines,
feedback, dummy scans, surface-coil-correction and phase-stabilisation scans. Parallel-imaging
calibration lines flagged ``ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING`` are imaging lines; lines
flagged ``ACQ_IS_PARALLEL_CALIBRATION`` only fill a column no imaging line filled, so the mask's
fully sampled centre, on which every reconstruction of this toolchain calibrates its ESPIRiT coil
maps, is the calibration region. Repeated lines (averages) are averaged. One image per
``(slice, contrast, phase, repetition, set)``; the mask is 1 on every column a line arrived for,
and must sample the centre column. Readout oversampling stays in k-space and is removed after the
reconstruction by the crop to the recon-space matrix, as fastMRI's files and the open-source MRD
servers do it.

Geometry. The acquisition header of the line nearest the k-space centre is kept per slice
(position, read / phase / slice directions, counters, time stamps): the image header is made from
it. fastMRI files carry no geometry; for them (and in ``spade convert``) a slice is placed
axially, read along ``+x``, phase along ``+y``, slice ``s`` of ``S`` at ``z = (s - (S - 1) / 2) *``
the encoded field of view's ``z`` (:func:`default_geometry`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import h5py
import ismrmrd
import numpy as np

from .coilmaps import acs_run
from ..errors import SpadeError
from ..io import atomic_path
from ..paths import memory_bytes

MAX_HEADER_BYTES = 16 << 20  # a scanner's XML header is tens of kilobytes
MAX_CHANNELS = 1024  # the acquisition header's channel mask holds 1024 channels

# Lines that are no image data (the open-source MRD servers skip the same).
SKIPPED_FLAGS = {
    ismrmrd.ACQ_IS_NOISE_MEASUREMENT: "noise",
    ismrmrd.ACQ_IS_NAVIGATION_DATA: "navigator",
    ismrmrd.ACQ_IS_PHASECORR_DATA: "phase correction",
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA: "feedback",
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA: "dummy scan",
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA: "feedback",
    ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA: "surface-coil correction",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE: "phase stabilisation",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION: "phase stabilisation",
}

SliceKey = tuple[int, int, int, int, int]  # (slice, contrast, phase, repetition, set)


def _flag(flags: int, bit: int) -> bool:
    return bool(int(flags) & (1 << (bit - 1)))


def slice_key(head) -> SliceKey:
    i = head.idx
    return int(i.slice), int(i.contrast), int(i.phase), int(i.repetition), int(i.set)


def slice_bytes_limit() -> int:
    """The most bytes one slice's k-space may take: 1/16 of this machine's memory, at most 2 GiB
    (the bound the fastMRI reader sets, 40 times a fastMRI brain slice)."""
    return min(memory_bytes() // 16, 2 << 30)


# ------------------------------------------------------------------------------------------------
# The header
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoding:
    """What a reconstruction takes from an MRD header (its first encoding)."""

    encoded: tuple[int, int]  # encodedSpace matrix (x: readout samples, y: lines) = k-space (H, W)
    recon: tuple[int, int]  # reconSpace matrix (x, y), each clipped to the encoded one
    encoded_fov: tuple[float, float, float]  # mm
    recon_fov: tuple[float, float, float]  # mm
    centre_line: int  # encodingLimits kspace_encoding_step_1 center
    acceleration: int | None  # parallelImaging accelerationFactor kspace_encoding_step_1

    @property
    def shape(self) -> tuple[int, int]:
        """k-space (H, W): readout x lines."""
        return self.encoded

    def column(self, line: int) -> int:
        return int(line) - self.centre_line + self.encoded[1] // 2


def _text(xml: str | bytes | np.bytes_) -> str:
    if isinstance(xml, (bytes, np.bytes_)):
        if len(xml) > MAX_HEADER_BYTES:
            raise SpadeError(f"the MRD header is {len(xml):,} bytes, more than the {MAX_HEADER_BYTES:,} accepted")
        try:
            return bytes(xml).split(b"\0", 1)[0].decode("utf-8")
        except UnicodeDecodeError:
            raise SpadeError("the MRD header is not UTF-8 text") from None
    return str(xml).split("\0", 1)[0]


def parse_header(xml: str | bytes) -> tuple[ismrmrd.xsd.ismrmrdHeader, Encoding]:
    """The header (``ismrmrd.xsd``'s parser, the schema's types) and its :class:`Encoding`; a
    header that is no ISMRMRD XML, has no encoding, or encodes anything but 2-D Cartesian k-space
    is a one-line :class:`SpadeError`."""
    text = _text(xml)
    try:
        header = ismrmrd.xsd.CreateFromDocument(text)
    except Exception as exc:  # xsdata raises parser, type and value errors alike
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise SpadeError(f"the MRD header is not valid ISMRMRD XML ({reason})") from None
    if not header.encoding:
        raise SpadeError("the MRD header has no encoding: nothing says how its k-space is laid out")
    return header, encoding_of(header)


def encoding_of(header: ismrmrd.xsd.ismrmrdHeader) -> Encoding:
    enc = header.encoding[0]
    if enc.trajectory != ismrmrd.xsd.trajectoryType.CARTESIAN:
        raise SpadeError(f"the MRD header's trajectory is {enc.trajectory.value}; only Cartesian k-space is reconstructed")
    es, rs = enc.encodedSpace, enc.reconSpace
    x, y, z = es.matrixSize.x, es.matrixSize.y, es.matrixSize.z
    if z != 1:
        raise SpadeError(f"3-D encoding (encoded matrix z = {z}) is not supported: 2-D multi-slice Cartesian only")
    if not (2 <= x <= 65535 and 2 <= y <= 65535):
        raise SpadeError(f"the encoded matrix {x} x {y} is not a 2-D k-space (each side 2 to 65535)")
    rx, ry = rs.matrixSize.x, rs.matrixSize.y
    if rx < 1 or ry < 1:
        raise SpadeError(f"the recon matrix {rx} x {ry} is empty")
    limits = enc.encodingLimits.kspace_encoding_step_1 if enc.encodingLimits is not None else None
    centre = limits.center if limits is not None and limits.center is not None else y // 2
    acc = None
    if enc.parallelImaging is not None and enc.parallelImaging.accelerationFactor is not None:
        acc = enc.parallelImaging.accelerationFactor.kspace_encoding_step_1
    fov = lambda s: tuple(float(v) for v in (s.fieldOfView_mm.x, s.fieldOfView_mm.y, s.fieldOfView_mm.z))  # noqa: E731
    for name, f in (("encoded", fov(es)), ("recon", fov(rs))):
        if not all(math.isfinite(v) and v >= 0 for v in f):
            raise SpadeError(f"the {name} field of view {f} mm is not a finite non-negative size")
    return Encoding(encoded=(int(x), int(y)), recon=(min(int(rx), int(x)), min(int(ry), int(y))),
                    encoded_fov=fov(es), recon_fov=fov(rs), centre_line=int(centre), acceleration=acc)


# ------------------------------------------------------------------------------------------------
# Acquisitions -> per-slice k-space
# ------------------------------------------------------------------------------------------------
@dataclass
class RawSlice:
    """One image's measurements: k-space as fastMRI lays it out and the mask of what arrived."""

    key: SliceKey
    kspace: np.ndarray  # (C, H, W) complex64, zero where no line arrived
    mask: np.ndarray  # (W,) float32, 1 where a line arrived
    reference: ismrmrd.AcquisitionHeader  # header of the line nearest the k-space centre
    lines: int  # imaging lines received (averages counted)
    calibration_lines: int  # calibration-only lines received


@dataclass
class _Buffer:
    sums: np.ndarray  # (C, H, W) complex64
    counts: np.ndarray  # (W,) int32, imaging lines per column
    calibration: dict[int, list] = field(default_factory=dict)  # column -> [sum (C, H), count]
    reference: ismrmrd.AcquisitionHeader | None = None
    ref_distance: int = 1 << 30
    calibration_lines: int = 0


class SliceAssembler:
    """Acquisitions in, per-slice k-space out, by the rules in the module docstring.

    :meth:`accepts` checks a line's header before its samples are read (a stream can refuse a
    line of the wrong size without reading it); :meth:`add` files an acquisition and returns the
    slices it completed (``ACQ_LAST_IN_SLICE``: its own; ``ACQ_LAST_IN_MEASUREMENT``: every slice
    still open); :meth:`take` hands one slice over. The k-space held at once is bounded by
    ``max_bytes`` (default: eight slices of the :func:`slice_bytes_limit`, at most 4 GiB)."""

    def __init__(self, encoding: Encoding, max_bytes: int | None = None):
        self.encoding = encoding
        self.channels: int | None = None
        self.max_bytes = max_bytes if max_bytes is not None else min(8 * slice_bytes_limit(), 4 << 30)
        self._buffers: dict[SliceKey, _Buffer] = {}
        self.skipped: dict[str, int] = {}

    @property
    def pending(self) -> list[SliceKey]:
        return list(self._buffers)

    def accepts(self, head) -> bool:
        """True for a line of image data (checked against the header: a one-line
        :class:`SpadeError` where it cannot belong to it); False for a line that is skipped."""
        flags = int(head.flags)
        for bit, what in SKIPPED_FLAGS.items():
            if _flag(flags, bit):
                self.skipped[what] = self.skipped.get(what, 0) + 1
                return False
        if int(head.encoding_space_ref) != 0:
            self.skipped["other encoding"] = self.skipped.get("other encoding", 0) + 1
            return False
        h, w = self.encoding.shape
        ns, pre, post = int(head.number_of_samples), int(head.discard_pre), int(head.discard_post)
        kept = ns - pre - post
        if kept != h:
            dropped = f" ({ns} less {pre} + {post} discarded)" if pre or post else ""
            raise SpadeError(f"k-space of the wrong size: a readout of {kept} samples{dropped} for an encoded matrix "
                             f"of {h} readout samples")
        c = int(head.active_channels)
        if not 1 <= c <= MAX_CHANNELS:
            raise SpadeError(f"a readout of {c} channels (1 to {MAX_CHANNELS} accepted)")
        if self.channels is None:
            need = c * h * w * 8
            if need > slice_bytes_limit():
                raise SpadeError(f"a slice of {c} channels x {h} x {w} ({need / 2**30:,.1f} GiB) would not fit in this "
                                 "machine's memory")
            self.channels = c
        elif c != self.channels:
            raise SpadeError(f"k-space of the wrong size: a readout of {c} channels after readouts of {self.channels}")
        if int(head.idx.kspace_encode_step_2) != 0:
            raise SpadeError(f"a line of 3-D encoding step {int(head.idx.kspace_encode_step_2)}: 2-D k-space only")
        col = self.encoding.column(head.idx.kspace_encode_step_1)
        if not 0 <= col < w:
            raise SpadeError(f"k-space of the wrong size: line {int(head.idx.kspace_encode_step_1)} lies outside the "
                             f"{w} encoded lines (centre line {self.encoding.centre_line})")
        return True

    def add(self, acq: ismrmrd.Acquisition) -> list[SliceKey]:
        head = acq.getHead()
        flags = int(head.flags)
        if not self.accepts(head):
            return self.pending if _flag(flags, ismrmrd.ACQ_LAST_IN_MEASUREMENT) else []
        h, w = self.encoding.shape
        pre, ns = int(head.discard_pre), int(head.number_of_samples)
        data = np.asarray(acq.data)[:, pre : pre + h]
        if _flag(flags, ismrmrd.ACQ_IS_REVERSE):
            data = data[:, ::-1]
        key = slice_key(head)
        buf = self._buffers.get(key)
        if buf is None:
            held = sum(b.sums.nbytes for b in self._buffers.values())
            size = self.channels * h * w * 8
            if held + size > self.max_bytes:
                raise SpadeError(f"{len(self._buffers)} slices are open at once ({(held + size) / 2**30:,.1f} GiB of "
                                 "k-space); the stream never ends a slice (ACQ_LAST_IN_SLICE)")
            buf = self._buffers[key] = _Buffer(np.zeros((self.channels, h, w), np.complex64), np.zeros(w, np.int32))
        col = self.encoding.column(head.idx.kspace_encode_step_1)
        calibration_only = (_flag(flags, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                            and not _flag(flags, ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING))
        if calibration_only:
            entry = buf.calibration.setdefault(col, [np.zeros((self.channels, h), np.complex64), 0])
            entry[0] += data
            entry[1] += 1
            buf.calibration_lines += 1
        else:
            buf.sums[:, :, col] += data
            buf.counts[col] += 1
        distance = abs(col - w // 2)
        if distance < buf.ref_distance:
            buf.reference, buf.ref_distance = head, distance
        if _flag(flags, ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            return self.pending
        return [key] if _flag(flags, ismrmrd.ACQ_LAST_IN_SLICE) else []

    def take(self, key: SliceKey) -> RawSlice:
        buf = self._buffers.pop(key)
        kspace, counts = buf.sums, buf.counts
        seen = counts > 0
        kspace[:, :, seen] /= counts[seen].astype(np.float32)
        mask = seen.astype(np.float32)
        for col, (total, n) in buf.calibration.items():
            if not seen[col]:
                kspace[:, :, col] = total / n
                mask[col] = 1.0
        try:
            acs_run(mask)
        except SpadeError:
            raise SpadeError(f"slice {key[0]}: the lines that arrived do not sample the centre line of k-space "
                             "(no calibration region to estimate coil maps from)") from None
        return RawSlice(key=key, kspace=kspace, mask=mask, reference=buf.reference, lines=int(counts.sum()),
                        calibration_lines=buf.calibration_lines)


# ------------------------------------------------------------------------------------------------
# Raw HDF5 files
# ------------------------------------------------------------------------------------------------
def is_raw(f: h5py.File, group: str = "dataset") -> bool:
    """An ISMRMRD raw file: ``/<group>/xml`` and ``/<group>/data``."""
    g = f.get(group)
    return isinstance(g, h5py.Group) and isinstance(g.get("xml"), h5py.Dataset) and isinstance(g.get("data"), h5py.Dataset)


def open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise SpadeError(f"{path} is not a readable HDF5 file ({str(exc).splitlines()[0]})") from None


def _read_xml(path: Path, f: h5py.File) -> str:
    ds = f["dataset/xml"]
    try:
        value = ds[0] if ds.shape not in ((), None) and len(ds.shape) == 1 and ds.shape[0] >= 1 else ds[()]
    except (TypeError, ValueError, OSError):
        raise SpadeError(f"{path}: /dataset/xml is not a text dataset") from None
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else b""
    if not isinstance(value, (bytes, str, np.bytes_)):
        raise SpadeError(f"{path}: /dataset/xml is not a text dataset")
    return _text(value if not isinstance(value, str) else value)


class RawFile:
    """An ISMRMRD raw HDF5 file, indexed by slice from its acquisition headers alone; a slice's
    samples are read when asked for (:meth:`read_slice`). Every check a stream gets is made on
    opening (header, line sizes, channels, each slice's centre line), each a one-line
    :class:`SpadeError` naming the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open_h5(self.path) as f:
            if not is_raw(f):
                raise SpadeError(f"{self.path} is not an ISMRMRD raw file (no /dataset/xml and /dataset/data)")
            try:
                self.header, self.encoding = parse_header(_read_xml(self.path, f))
            except SpadeError as exc:
                raise SpadeError(f"{self.path}: {exc}") from None
            data = f["dataset/data"]
            names = data.dtype.names or ()
            if not {"head", "data"} <= set(names) or data.ndim != 1:
                raise SpadeError(f"{self.path}: /dataset/data is not a table of ISMRMRD acquisitions")
            try:
                heads = data.fields("head")[()]
            except (TypeError, ValueError, OSError) as exc:
                raise SpadeError(f"{self.path}: /dataset/data cannot be read ({str(exc).splitlines()[0]})") from None
        if heads.dtype.itemsize != ismrmrd.hdf5.acquisition_header_dtype.itemsize:
            raise SpadeError(f"{self.path}: its acquisition headers are not ISMRMRD's ({heads.dtype.itemsize} bytes)")
        asm = SliceAssembler(self.encoding)
        rows: dict[SliceKey, list[int]] = {}
        cols: dict[SliceKey, set[int]] = {}
        refs: dict[SliceKey, tuple[int, ismrmrd.AcquisitionHeader]] = {}
        h, w = self.encoding.shape
        for i, raw in enumerate(heads):
            head = ismrmrd.AcquisitionHeader.from_buffer_copy(raw.tobytes())
            try:
                if not asm.accepts(head):
                    continue
            except SpadeError as exc:
                raise SpadeError(f"{self.path}: acquisition {i}: {exc}") from None
            key, col = slice_key(head), self.encoding.column(head.idx.kspace_encode_step_1)
            rows.setdefault(key, []).append(i)
            cols.setdefault(key, set()).add(col)
            if key not in refs or abs(col - w // 2) < refs[key][0]:
                refs[key] = (abs(col - w // 2), head)
        if not rows:
            raise SpadeError(f"{self.path}: no imaging acquisitions (only {', '.join(asm.skipped) or 'nothing'})")
        self.channels = int(asm.channels)
        self.keys = sorted(rows)
        self._rows = [rows[k] for k in self.keys]
        self.masks = []
        for key in self.keys:
            m = np.zeros(w, np.float32)
            m[sorted(cols[key])] = 1.0
            self.masks.append(m)
        self.fully_sampled = all(m.all() for m in self.masks)
        if not self.fully_sampled:
            for key, m in zip(self.keys, self.masks):
                try:
                    acs_run(m)
                except SpadeError:
                    raise SpadeError(f"{self.path}: slice {key[0]}: its lines do not sample the centre line of k-space "
                                     "(no calibration region to estimate coil maps from)") from None
        self.references = [refs[k][1] for k in self.keys]

    @property
    def n_slices(self) -> int:
        return len(self.keys)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every slice."""
        return (self.channels, *self.encoding.shape)

    @property
    def file_mask(self) -> np.ndarray | None:
        """None when every slice is fully sampled (then undersampled retrospectively, as a fully
        sampled fastMRI file); else the first slice's mask (each slice has its own)."""
        return None if self.fully_sampled else self.masks[0]

    def read_slice(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Slice ``index``'s k-space ``(C, H, W)`` complex64 and its mask (None: fully sampled file)."""
        raw = self.raw_slice(index)
        return raw.kspace, (None if self.fully_sampled else raw.mask)

    def raw_slice(self, index: int) -> RawSlice:
        rows = self._rows[index]
        with open_h5(self.path) as f:
            records = f["dataset/data"][rows]
        asm = SliceAssembler(self.encoding)
        for i, rec in zip(rows, records):
            acq = ismrmrd.Acquisition(rec["head"])
            values = np.asarray(rec["data"], dtype=np.float32)
            if values.size != 2 * acq.active_channels * acq.number_of_samples:
                raise SpadeError(f"{self.path}: acquisition {i} holds {values.size // 2} samples, its header "
                                 f"{acq.active_channels} x {acq.number_of_samples}")
            if not np.isfinite(values).all():
                raise SpadeError(f"{self.path}: acquisition {i} contains NaN or inf values")
            acq.data[:] = values.view(np.complex64).reshape(acq.active_channels, acq.number_of_samples)
            asm.add(acq)
        return asm.take(self.keys[index])


# ------------------------------------------------------------------------------------------------
# fastMRI -> ISMRMRD raw
# ------------------------------------------------------------------------------------------------
def default_geometry(s: int, n_slices: int, slice_thickness: float) -> ismrmrd.AcquisitionHeader:
    """A slice placed axially (read +x, phase +y, slice +z), centred on the isocentre, slices
    ``slice_thickness`` mm apart: for files that carry no geometry (fastMRI's)."""
    head = ismrmrd.AcquisitionHeader()
    head.version = 1
    head.read_dir[:] = (1.0, 0.0, 0.0)
    head.phase_dir[:] = (0.0, 1.0, 0.0)
    head.slice_dir[:] = (0.0, 0.0, 1.0)
    head.position[:] = (0.0, 0.0, (s - (n_slices - 1) / 2) * slice_thickness)
    head.idx.slice = s
    return head


def _synthetic_header(h: int, w: int, recon: tuple[int, int]) -> ismrmrd.xsd.ismrmrdHeader:
    space = lambda x, y: (f"<matrixSize><x>{x}</x><y>{y}</y><z>1</z></matrixSize>"  # noqa: E731
                          f"<fieldOfView_mm><x>{x}</x><y>{y}</y><z>1</z></fieldOfView_mm>")
    xml = ('<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
           "<experimentalConditions><H1resonanceFrequency_Hz>0</H1resonanceFrequency_Hz></experimentalConditions>"
           f"<encoding><encodedSpace>{space(h, w)}</encodedSpace><reconSpace>{space(*recon)}</reconSpace>"
           "<encodingLimits/><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>")
    return ismrmrd.xsd.CreateFromDocument(xml)


def header_for_fastmri(source_xml: str | None, shape: tuple[int, int, int, int], recon: tuple[int, int],
                       acceleration: int | None) -> ismrmrd.xsd.ismrmrdHeader:
    """The ISMRMRD header of a fastMRI file's k-space ``(slices, coils, H, W)``: the file's own
    ``ismrmrd_header`` where it parses (fastMRI's are scanner headers), with the encoded matrix,
    the line limits, the slice count and the channels set from the k-space; else a minimal one
    (1 mm pixels: such a file states no field of view)."""
    n, c, h, w = shape
    header = None
    if source_xml:
        try:
            header, _ = parse_header(source_xml)
        except SpadeError:
            header = None
    if header is None:
        header = _synthetic_header(h, w, recon)
    xsd = ismrmrd.xsd
    enc = header.encoding[0]
    enc.trajectory = xsd.trajectoryType.CARTESIAN
    enc.encodedSpace.matrixSize = xsd.matrixSizeType(x=h, y=w, z=1)
    enc.reconSpace.matrixSize = xsd.matrixSizeType(x=recon[0], y=recon[1], z=1)
    limits = enc.encodingLimits or xsd.encodingLimitsType()
    limits.kspace_encoding_step_1 = xsd.limitType(minimum=0, maximum=w - 1, center=w // 2)
    limits.kspace_encoding_step_2 = xsd.limitType(minimum=0, maximum=0, center=0)
    limits.slice = xsd.limitType(minimum=0, maximum=n - 1, center=0)
    enc.encodingLimits = limits
    if acceleration is not None:
        enc.parallelImaging = xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=acceleration, kspace_encoding_step_2=1),
            calibrationMode=xsd.calibrationModeType.EMBEDDED)
    else:
        enc.parallelImaging = None
    header.encoding = [enc]
    if header.acquisitionSystemInformation is None:
        header.acquisitionSystemInformation = xsd.acquisitionSystemInformationType()
    header.acquisitionSystemInformation.receiverChannels = c
    return header


def header_xml(header: ismrmrd.xsd.ismrmrdHeader) -> str:
    return ismrmrd.xsd.ToXML(header, encoding="utf-8")


def put_row(table: np.ndarray, i: int, acq: ismrmrd.Acquisition) -> None:
    """Row ``i`` of ``/dataset/data``, laid out as the ``ismrmrd`` package lays it out."""
    table["head"][i] = np.frombuffer(acq.getHead(), dtype=ismrmrd.hdf5.acquisition_header_dtype)[0]
    table["traj"][i] = acq.traj.astype(np.float32).reshape(-1)
    table["data"][i] = np.ascontiguousarray(acq.data).view(np.float32).reshape(-1)


def acquisition_table(acqs: Iterable[ismrmrd.Acquisition]) -> np.ndarray:
    """The ``/dataset/data`` table of ``acqs``."""
    acqs = list(acqs)
    table = np.empty(len(acqs), dtype=ismrmrd.hdf5.acquisition_dtype)
    for i, acq in enumerate(acqs):
        put_row(table, i, acq)
    return table


def write_raw(path: str | Path, header: ismrmrd.xsd.ismrmrdHeader | str, table: np.ndarray) -> Path:
    """An ISMRMRD raw file: ``/dataset/xml`` and the acquisition table ``/dataset/data`` (the
    ``ismrmrd`` package's HDF5 types; :func:`acquisition_table`), written to a temporary file and
    renamed."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            g = f.create_group("dataset")
            xml = g.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
            xml[0] = (header if isinstance(header, str) else header_xml(header)).encode("utf-8")
            g.create_dataset("data", data=table, maxshape=(None,), chunks=True)
    return path


def acquisitions(path: str | Path) -> tuple[str, list[ismrmrd.Acquisition]]:
    """The XML header text and every acquisition of a raw file, in file order (what a client
    streams), read in one pass."""
    path = Path(path)
    with open_h5(path) as f:
        if not is_raw(f):
            raise SpadeError(f"{path} is not an ISMRMRD raw file (no /dataset/xml and /dataset/data)")
        xml = _read_xml(path, f)
        records = f["dataset/data"][()]
    out = []
    for i, rec in enumerate(records):
        acq = ismrmrd.Acquisition(rec["head"])
        values = np.asarray(rec["data"], dtype=np.float32)
        if values.size != 2 * acq.active_channels * acq.number_of_samples:
            raise SpadeError(f"{path}: acquisition {i} holds {values.size // 2} samples, its header "
                             f"{acq.active_channels} x {acq.number_of_samples}")
        acq.data[:] = values.view(np.complex64).reshape(acq.active_channels, acq.number_of_samples)
        traj = np.asarray(rec["traj"], dtype=np.float32)
        if acq.trajectory_dimensions and traj.size == acq.number_of_samples * acq.trajectory_dimensions:
            acq.traj[:] = traj.reshape(acq.number_of_samples, acq.trajectory_dimensions)
        out.append(acq)
    return xml, out
