"""``spade serve`` as a user runs it: a real server process on a free port, streams of ISMRMRD raw
data made from the embedded dataset (``spade convert``'s library call), ``spade send`` as the
client, and ``spade reconstruct --format mrd`` of the same files as the reference.

Tolerance: the server and ``spade reconstruct --batch-size 1`` make the same calls for the same
measurements, and both run the engine recorded for the 48 x 48 data in the shared export manifest,
so images agree to a 12-bit pixel (1 / 4095 of the image maximum) plus float noise; the
oversampled stream's 96 x 48 k-space gets its engine measured by the server on its first slice
while ``spade reconstruct`` runs the 48 x 48 choice, so there engines may differ: both converge
to the DEQ's fixed point within its tolerance (1e-4 relative), and we allow 2e-3 of the maximum.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest
import torch

from spade_deploy.mri.images import image_magnitude, read_mrd_images
from spade_deploy.mri.convert import fastmri_to_raw
from spade_deploy.mri.ismrmrd_raw import acquisition_table, acquisitions, write_raw
from spade_deploy.mri.mrd_stream import MessageReader, MessageWriter, StreamEnded
from spade_deploy.paths import sha256_file
from spade_deploy.mri.physics import fft2c, ifft2c
from spade_deploy.models import bundled_path

SPADE = str(Path(sys.executable).parent / "spade")
CKPT = bundled_path("deq", "small")
SAME_ENGINE_TOL = 1.5 / 4095  # one 12-bit pixel, rounding on either side
OTHER_ENGINE_TOL = 2e-3


def _env(home: Path) -> dict:
    (home / "tmp").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(home), "XDG_CACHE_HOME": str(home / "cache"),
            "TMPDIR": str(home / "tmp")}


class Server:
    """A ``spade serve`` process; its log lines are collected as they come."""

    def __init__(self, home: Path, cwd: Path):
        cwd.mkdir(parents=True, exist_ok=True)
        self.cwd = cwd
        self.proc = subprocess.Popen([SPADE, "serve", str(CKPT), "--port", "0", "--size", "48x48"], cwd=cwd,
                                     env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._new = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        line = self.wait_for(lambda l: "ready: listening on" in l, 180)
        self.port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, predicate, timeout: float = 60) -> str:
        """The first log line (seen or to come) for which ``predicate`` holds."""
        seen = 0
        until = time.monotonic() + timeout
        while True:
            for line in self.lines[seen:]:
                if predicate(line):
                    return line
            seen = len(self.lines)
            try:
                if self._new.get(timeout=max(0.01, until - time.monotonic())) is None and self.proc.poll() is not None:
                    raise AssertionError("spade serve ended:\n" + "\n".join(self.lines))
            except queue.Empty:
                raise AssertionError(f"no such log line within {timeout} s:\n" + "\n".join(self.lines)) from None

    def lines_about(self, port: int) -> list[str]:
        return [l for l in self.lines if f"127.0.0.1:{port}:" in l]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _oversampled(src: Path, dst: Path) -> Path:
    """``src``'s k-space with 2x readout oversampling (the image zero-padded along the readout,
    the header's encoded matrix 96 x 48 over 480 x 240 mm, recon 48 x 48 over 240 x 240 mm)."""
    with h5py.File(src, "r") as f:
        k = torch.from_numpy(f["kspace"][()])
    img = ifft2c(k)
    pad = torch.zeros(*img.shape[:2], 2 * img.shape[2], img.shape[3], dtype=img.dtype)
    pad[:, :, img.shape[2] // 2 : img.shape[2] // 2 + img.shape[2]] = img
    space = lambda x, y, fx, fy: (f"<matrixSize><x>{x}</x><y>{y}</y><z>1</z></matrixSize>"  # noqa: E731
                                  f"<fieldOfView_mm><x>{fx}</x><y>{fy}</y><z>5</z></fieldOfView_mm>")
    xml = ('<?xml version="1.0" encoding="utf-8"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
           "<experimentalConditions><H1resonanceFrequency_Hz>63600000</H1resonanceFrequency_Hz></experimentalConditions>"
           f"<encoding><encodedSpace>{space(96, 48, 480, 240)}</encodedSpace><reconSpace>{space(48, 48, 240, 240)}"
           "</reconSpace><encodingLimits/><trajectory>cartesian</trajectory></encoding></ismrmrdHeader>")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(dst, "w") as f:
        f["kspace"] = fft2c(pad).numpy().astype(np.complex64)
        f["ismrmrd_header"] = np.bytes_(xml)
    return dst


def _with_junk(src: Path, dst: Path) -> Path:
    """``src`` with lines a reconstruction must skip: a noise scan first (another readout length,
    huge values), a navigator and a phase-correction line on the centre line mid-stream."""
    xml, acqs = acquisitions(src)
    rng = np.random.default_rng(1)
    noise = ismrmrd.Acquisition.from_array((1e6 * rng.standard_normal((8, 192))).astype(np.complex64))
    noise.setFlag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    junk = []
    for flag in (ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_PHASECORR_DATA):
        centre = next(a for a in acqs if a.idx.kspace_encode_step_1 == 24)
        a = ismrmrd.Acquisition(centre.getHead(), (centre.data * 1e6).astype(np.complex64))
        a.clearAllFlags()
        a.setFlag(flag)
        junk.append(a)
    stream = [noise, *acqs[:5], *junk, *acqs[5:]]
    return write_raw(dst, xml, acquisition_table(stream))


@pytest.fixture(scope="module")
def streams(tiny_dataset, tmp_path_factory):
    """Raw files in their own folder: A (the test volume, 2 slices), B (a training volume with
    readout oversampling, 2 slices) and B with junk lines; undersampled 4x, 8 calibration lines."""
    root = tmp_path_factory.mktemp("serve-data")
    test_file = sorted((tiny_dataset.root / "test").glob("*.h5"))[0]
    train_file = sorted((tiny_dataset.root / "train").glob("*.h5"))[0]
    raw = root / "raw"
    a = fastmri_to_raw(test_file, raw / "a.h5", acceleration=4, center_fraction=0.16).output
    b_clean = fastmri_to_raw(_oversampled(train_file, root / "fastmri" / "b.h5"), root / "clean" / "b.h5",
                             acceleration=4, center_fraction=0.16).output
    b_junk = _with_junk(b_clean, raw / "b-junk.h5")
    return {"A": a, "B": b_clean, "B-junk": b_junk, "root": root}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return tmp_path_factory.mktemp("serve-home")


@pytest.fixture(scope="module")
def server(home, tmp_path_factory):
    """One server for the module; the last test stops it with SIGTERM (a test run alone gets its
    own)."""
    srv = Server(home, tmp_path_factory.mktemp("serve-cwd"))
    yield srv
    code = srv.stop()
    assert code == 0, "\n".join(srv.lines)
    assert not any("Traceback" in l for l in srv.lines), "\n".join(srv.lines)


@pytest.fixture(scope="module")
def reference(server, streams, home, tmp_path_factory):
    """``spade reconstruct --format mrd`` of A and of B without junk, one slice per call as the
    server runs them (after the server recorded its engine choice in the shared manifest)."""
    folder = tmp_path_factory.mktemp("ref-in")
    shutil.copy(streams["A"], folder / "a.h5")
    shutil.copy(streams["B"], folder / "b.h5")
    out = tmp_path_factory.mktemp("ref-out")
    proc = subprocess.run([SPADE, "reconstruct", str(CKPT), str(folder), "-o", str(out), "--format", "mrd",
                           "--batch-size", "1"], env=_env(home), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"A": read_mrd_images(out / "a.h5")[1], "B": read_mrd_images(out / "b.h5")[1]}


def _send(raw: Path, out: Path, port: int, home: Path, wait: bool = True):
    cmd = [SPADE, "send", str(raw), "-o", str(out), "--port", str(port), "--timeout", "300"]
    if not wait:
        return subprocess.Popen(cmd, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=_env(home), capture_output=True, text=True, timeout=600)


def _head_fields(img: ismrmrd.Image) -> dict:
    h = img.getHead()
    return {name: (list(getattr(h, name)) if hasattr(getattr(h, name), "_length_") else getattr(h, name))
            for name, _ in h._fields_ if name != "attribute_string_len"}


def _assert_same_images(got: list, want: list, tol: float, same_engine: bool = True) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert _head_fields(g) == _head_fields(w)
        mg, mw = image_magnitude(g), image_magnitude(w)
        assert mg.shape == mw.shape
        assert np.abs(mg - mw).max() <= tol * mw.max()
        for key in ("SpadeModel", "SpadeCheckpointSHA256", "DataRole") + (("SpadeEngine",) if same_engine else ()):
            assert g.meta[key] == w.meta[key]
        assert abs(int(g.meta["SpadeIterations"]) - int(w.meta["SpadeIterations"])) <= 1
        assert float(g.meta["SpadeLatencyMs"]) > 0 and "SpadeLatencyMs" not in w.meta


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_send_gets_the_images_spade_reconstruct_writes(server, streams, reference, home, tmp_path):
    before = _tree(streams["root"])
    out = tmp_path / "out"
    proc = _send(streams["A"], out / "a-images.h5", server.port, home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 images" in proc.stdout
    _, images = read_mrd_images(out / "a-images.h5")
    _assert_same_images(images, reference["A"], SAME_ENGINE_TOL)
    sha = sha256_file(CKPT)
    for i, img in enumerate(images):  # the header a console files the image by
        assert img.matrix_size == (48, 48, 1) and img.data.dtype == np.uint16 and img.data.max() == 4095
        assert [round(v, 3) for v in img.field_of_view] == [240.0, 240.0, 5.0]
        assert img.image_type == ismrmrd.IMTYPE_MAGNITUDE
        assert (img.image_series_index, img.image_index, img.slice) == (1, i + 1, i)
        assert list(img.read_dir) == [1, 0, 0] and list(img.phase_dir) == [0, 1, 0]
        assert list(img.position) == pytest.approx([0.0, 0.0, -2.5 + 5.0 * i])
        assert img.meta["SpadeModel"] == "deq" and img.meta["SpadeCheckpointSHA256"] == sha
        assert img.meta["SpadeConverged"] == "1" and int(img.meta["SpadeIterations"]) > 1
    # nothing but the output the client asked for
    assert [p.name for p in out.iterdir()] == ["a-images.h5"]
    assert _tree(streams["root"]) == before


def test_two_clients_at_once_get_their_own_images(server, streams, reference, home, tmp_path):
    """A and, at the same time, B: readout-oversampled (96 x 48 k-space: deployed on its first
    slice, cropped to the 48 x 48 recon matrix) and carrying noise / navigator / phase-correction
    lines, which must leave its images those of B without them."""
    procs = {"A": _send(streams["A"], tmp_path / "a.h5", server.port, home, wait=False),
             "B": _send(streams["B-junk"], tmp_path / "b.h5", server.port, home, wait=False)}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, name + ": " + output
    _assert_same_images(read_mrd_images(tmp_path / "a.h5")[1], reference["A"], SAME_ENGINE_TOL)
    _, b = read_mrd_images(tmp_path / "b.h5")
    _assert_same_images(b, reference["B"], OTHER_ENGINE_TOL, same_engine=False)
    assert all(img.matrix_size == (48, 48, 1) for img in b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "b.h5"]


def _answer(sock: socket.socket) -> list[tuple[str, object]]:
    """The server's messages until its close (or the end of the connection)."""
    reader, got = MessageReader(sock), []
    try:
        while True:
            msg = reader.next()
            got.append((msg.name, msg.value if isinstance(msg.value, str) else None))
            if msg.name == "close":
                return got
    except StreamEnded:
        return got + [("ended", None)]


def test_hostile_clients_leave_the_server_serving(server, streams, reference, home, tmp_path):
    xml, acqs = acquisitions(streams["A"])

    def connect():
        return socket.create_connection(("127.0.0.1", server.port), timeout=120)

    def garbage(s):
        s.sendall(b"\x13\x37 not an MRD message " * 50)

    def unknown_id(s):
        s.sendall(struct.pack("<H", 999))

    def no_encoding(s):
        MessageWriter(s).header('<?xml version="1.0"?><ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
                                "<experimentalConditions><H1resonanceFrequency_Hz>63600000</H1resonanceFrequency_Hz>"
                                "</experimentalConditions></ismrmrdHeader>")

    def wrong_size(s):
        w = MessageWriter(s)
        w.header(xml)
        w.acquisition(ismrmrd.Acquisition.from_array(np.ones((8, 40), np.complex64)))

    def truncated(s):
        w = MessageWriter(s)
        w.header(xml)
        w.acquisition(acqs[0])
        s.sendall(struct.pack("<H", 1008) + acqs[1].to_bytes()[:400])
        s.shutdown(socket.SHUT_WR)

    cases = {garbage: "unknown message id", unknown_id: "unknown message id 999", no_encoding: "no encoding",
             wrong_size: "k-space of the wrong size", truncated: "client disconnected mid-stream"}
    for case, reason in cases.items():
        with connect() as s:
            port = s.getsockname()[1]
            case(s)
            answer = _answer(s)
        assert answer[0][0] == "text" and answer[0][1].startswith("ERR") and reason in answer[0][1], (case, answer)
        assert answer[-1][0] == "close"
        server.wait_for(lambda l: f"127.0.0.1:{port}:" in l)
        assert len(server.lines_about(port)) == 1 and reason in server.lines_about(port)[0]
    # a client that disconnects mid-stream, without a word
    with connect() as s:
        port = s.getsockname()[1]
        w = MessageWriter(s)
        w.config_file("spade")
        w.header(xml)
        for acq in acqs[:5]:
            w.acquisition(acq)
    server.wait_for(lambda l: f"127.0.0.1:{port}:" in l)
    assert len(server.lines_about(port)) == 1 and "disconnected mid-stream" in server.lines_about(port)[0]
    # ... and the next client is served as if nothing happened
    proc = _send(streams["A"], tmp_path / "after.h5", server.port, home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_same_images(read_mrd_images(tmp_path / "after.h5")[1], reference["A"], SAME_ENGINE_TOL)
    assert server.proc.poll() is None
    assert not any("Traceback" in l for l in server.lines)


def test_send_reports_a_refused_stream_and_writes_nothing(server, streams, home, tmp_path):
    """An ERR from the server is the client's one-line error; no output file is written."""
    bad = tmp_path / "in" / "bad.h5"
    xml, acqs = acquisitions(streams["A"])
    write_raw(bad, xml.replace("<x>48</x>", "<x>64</x>", 1), acquisition_table(acqs))  # k-space of the wrong size
    proc = _send(bad, tmp_path / "out" / "images.h5", server.port, home)
    assert proc.returncode == 1
    assert proc.stderr.count("error:") == 1 and "k-space of the wrong size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_sigterm_finishes_the_slice_in_flight_then_stops(server, streams):
    """Last in the module: the server is stopped while a client's first slice has arrived."""
    srv = server
    xml, acqs = acquisitions(streams["A"])
    first_slice = [a for a in acqs if a.idx.slice == 0]
    assert first_slice[-1].isFlagSet(ismrmrd.ACQ_LAST_IN_SLICE)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=120) as s:
        w = MessageWriter(s)
        w.config_file("spade")
        w.header(xml)
        for acq in first_slice:
            w.acquisition(acq)
        srv.proc.send_signal(signal.SIGTERM)
        reader = MessageReader(s)
        kinds = [reader.next() for _ in range(3)]
    assert [m.name for m in kinds] == ["image", "text", "close"]
    assert kinds[0].value.slice == 0 and kinds[1].value.startswith("ERR the server is stopping")
    assert srv.proc.wait(60) == 0
    assert any("stopped after" in l for l in srv.lines) and not any("Traceback" in l for l in srv.lines)
    assert not any(srv.cwd.iterdir())  # nothing written where the server runs
