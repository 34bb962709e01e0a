"""``spade serve``: an MRD streaming reconstruction server, the deployed loop behind a socket.

A scanner's reconstruction interface (FIRE, Gadgetron's clients, the open-source MRD clients,
``spade send``) connects, sends a config (file name or text; any is accepted and only logged), the
ISMRMRD XML header, the acquisitions and a close message (:mod:`.mrd_stream`). Per connection:

1. the header gives the encoded and recon matrices, the line numbering and the field of view
   (:func:`~.ismrmrd_raw.parse_header`);
2. acquisitions are filed per slice by their flags (:class:`~.ismrmrd_raw.SliceAssembler`: noise
   and other non-image scans skipped, calibration lines, averages); a line whose size does not fit
   the header is refused before its samples are read;
3. a slice is reconstructed as soon as it is complete (``ACQ_LAST_IN_SLICE``; every open slice at
   ``ACQ_LAST_IN_MEASUREMENT`` or at the close message): k-space and mask from the lines that
   arrived, ESPIRiT coil maps from the calibration region, the deployed loop, the crop to the
   recon matrix, exactly the calls ``spade reconstruct`` makes for the same measurements
   (``tasks.mri.make_batch``, the model, ``metrics.recon_magnitude``);
4. its MRD image (:func:`~.images.make_image`) is sent at once; after the close message the
   server sends its own close and ends the connection.

The model is loaded, deployed on the engine measured fastest here (``--backend auto``, as
``spade reconstruct`` chooses it, recorded in the export manifest under the cache home) and
warmed up at start for each ``--size``; a k-space size first seen in a stream is deployed on
its first slice. One thread per connection (at most ``max_connections``). The deployed model is
shared under one lock around the loop itself: a DEQ records its last solve on the model object
(iterations, convergence), and on one CPU or GPU two loops at once only compete for the same
cores; reading, calibration (ESPIRiT) and sending run outside the lock, concurrently.

Bad input ends only its own connection: a malformed or unknown message, a truncated stream, a
header without an encoding, k-space that does not fit its header, a client gone mid-stream. The
server logs one line for it, sends an MRD text message ``ERR <reason>`` and a close where the
socket still takes them, and goes on serving. SIGTERM / SIGINT: no new connections; connections
already made have the slices they completed reconstructed and sent, then get ``ERR the server is
stopping`` (a client still streaming is stopped at its next message once ``grace`` seconds have
passed, one neither sending nor reading is cut then); then the server exits (status 0).
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .acquisition import make_batch
from ..checkpoint import load_model
from .coilmaps import EspiritParams, centre_block, espirit_from_acs
from ..deploy.cache import default_engines_dir, export_for
from ..deploy.runtime import BACKENDS, deploy
from ..device import on_model_device, placed, require_device
from ..errors import SpadeError
from .ismrmrd_raw import Encoding, RawSlice, SliceAssembler, parse_header
from .images import PIXELS, make_image
from .metrics import recon_magnitude
from .mrd_stream import (ACQUISITION, CLOSE, CONFIG_FILE, CONFIG_TEXT, HEADER, IMAGE, TEXT, WAVEFORM, MessageReader,
                         MessageWriter, ProtocolError, Stopping, StreamEnded)
from ..paths import sha256_file
from .physics import synthetic_sample
from .reader import SliceItem, collate

log = logging.getLogger("spade_deploy.serve")

DEFAULT_PORT = 9002  # the port the open-source MRD servers and clients use
# One message from a client: a readout of 8,192 samples of 1,024 channels; a fastMRI brain line is
# 640 x 16 x 8 bytes = 80 KiB.
MAX_LINE_BYTES = 64 << 20


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0: any free port (the readiness line names it)
    device: str = "cpu"
    backend: str = "auto"
    engines: Path | None = None  # exported priors (default: the cache home's spade-deploy/engines)
    sizes: tuple[tuple[int, int], ...] = ((160, 160),)  # k-space sizes deployed and warmed up at start
    pixels: str = "uint16"
    idle_timeout: float = 300.0  # seconds without a byte before a connection is dropped
    max_connections: int = 16
    grace: float = 30.0  # after a stop, seconds a connection still busy streaming is given
    espirit: EspiritParams = field(default_factory=EspiritParams)


# ------------------------------------------------------------------------------------------------
class DeployedModel:
    """A checkpoint's model deployed for each k-space size, shared by every connection."""

    def __init__(self, checkpoint: Path, backend: str = "auto", device: str = "cpu", engines: Path | None = None):
        if backend not in BACKENDS:
            raise SpadeError(f"unknown back-end {backend!r}; choose from {', '.join(BACKENDS)}")
        require_device(device)
        self.checkpoint = Path(checkpoint)
        self.net, _ = load_model(self.checkpoint)
        if self.net.task != "mri":
            raise SpadeError(f"{self.checkpoint} is a {self.net.task} model; spade serve reconstructs MRI")
        self.net.eval()
        self.name = self.net.registry_name
        self.sha256 = sha256_file(self.checkpoint)
        self.backend, self.device, self.engines = backend, device, engines
        self.lock = threading.Lock()
        self._deployed: dict[tuple[int, int], torch.nn.Module] = {}
        self.engine: dict[tuple[int, int], str] = {}

    def _deploy(self, shape: tuple[int, int]) -> torch.nn.Module:
        if self.backend == "torch":
            net = placed(self.net, self.device)
        else:
            engines = self.engines if self.engines is not None else default_engines_dir()
            mpath, sha = export_for(self.checkpoint, self.net, engines, [self.backend])
            net = deploy(self.net, self.backend, mpath, self.device, shape=shape, checkpoint_sha256=sha)
        choice = getattr(net, "engine_choice", None)
        self.engine[shape] = ",".join(sorted(set(choice.values()))) if choice else self.backend
        with torch.no_grad():  # warm-up: the first call builds sessions and caches
            y, physics = synthetic_sample(*shape, device=self.device)
            net(y, physics)
        return net

    def prepare(self, shape: tuple[int, int]) -> str:
        """Deploy and warm up for k-space ``(H, W)`` unless done; returns the engine's name."""
        with self.lock:
            if shape not in self._deployed:
                self._deployed[shape] = self._deploy(shape)
                log.info(f"deployed for {shape[0]}x{shape[1]} k-space: {self.engine[shape]}"
                         + (" (measured fastest here)" if self.backend == "auto" else ""))
        return self.engine[shape]

    @torch.no_grad()
    def solve(self, batch) -> tuple[torch.Tensor, dict, float, float]:
        """``x`` of one measured batch, its solver record, the wait for the lock and the loop's time (s)."""
        shape = tuple(batch.y.shape[-2:])
        self.prepare(shape)
        t0 = time.perf_counter()
        with self.lock:
            t1 = time.perf_counter()
            net = self._deployed[shape]
            x = net(*on_model_device((batch.y, batch.physics), net))
            info = net.solve_info()
            record = {} if info is None else {"iterations": int(info.iterations[0]), "converged": bool(info.converged[0]),
                                              "residual": float(info.residual[0])}
            x = x.cpu()
            t2 = time.perf_counter()
        return x, record, t1 - t0, t2 - t1


class _StreamMaps:
    """ESPIRiT from the calibration region, as the dataset's estimator computes it, never cached on
    disk (a stream's maps are used once)."""

    def __init__(self, params: EspiritParams):
        self.params = params

    def __call__(self, y: np.ndarray, acs: tuple[int, int]) -> np.ndarray:
        return espirit_from_acs(y, acs, self.params)


# ------------------------------------------------------------------------------------------------
class _Connection:
    def __init__(self, server: "MRDServer", sock: socket.socket, addr, number: int):
        self.server, self.sock, self.number = server, sock, number
        self.who = f"#{number} {addr[0]}:{addr[1]}" if isinstance(addr, tuple) else f"#{number}"
        self.writer = MessageWriter(sock, timeout=server.config.idle_timeout)
        self.encoding: Encoding | None = None
        self.assembler: SliceAssembler | None = None
        self.images = 0
        self.latencies: list[float] = []
        self.maps = _StreamMaps(server.config.espirit)

    def _check_acquisition(self, head) -> None:
        """Before a line's samples are read: after the header, of a size the header allows (a
        skipped line, e.g. a noise scan, of at most MAX_LINE_BYTES)."""
        if self.assembler is None:
            raise ProtocolError("an acquisition before the XML header")
        size = int(head.number_of_samples) * (4 * int(head.trajectory_dimensions) + 8 * int(head.active_channels))
        if size > MAX_LINE_BYTES:
            raise ProtocolError(f"a readout of {size:,} bytes (at most {MAX_LINE_BYTES:,} accepted)")
        self.assembler.accepts(head)

    def run(self) -> None:
        cfg = self.server.config
        reader = MessageReader(self.sock, stop=self.server.stopping, idle_timeout=cfg.idle_timeout,
                               check_acquisition=self._check_acquisition, deadline=self.server.deadline,
                               max_read=MAX_LINE_BYTES)
        t0 = time.perf_counter()
        try:
            self._serve(reader)
            extra = f", latency {np.mean(self.latencies) * 1000:.0f} ms per slice" if self.latencies else ""
            log.info(f"{self.who}: {_count(self.images, 'image')} sent in {time.perf_counter() - t0:.2f} s{extra}")
        except Stopping:
            self._refuse("the server is stopping" + self._unfinished())
        except StreamEnded as exc:
            if exc.mid_message or reader.received or self.images:
                self._refuse(f"client disconnected mid-stream: {exc} after {reader.received} messages"
                             + self._unfinished())
            else:
                log.info(f"{self.who}: closed without sending anything")
        except SpadeError as exc:  # protocol errors, a bad header, k-space that does not fit it
            self._refuse(str(exc))
        except OSError as exc:  # sending failed: the client left without reading its images
            self._refuse(f"client disconnected before its images were sent ({exc.strerror or type(exc).__name__})")
        except Exception as exc:  # never a traceback: one line, the connection ends, the server goes on
            self._refuse(f"internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        finally:
            self._close()

    def _close(self, linger: float = 2.0) -> None:
        """Close after the client has read our last messages: our side is shut, what the client
        still sends is read and dropped until it closes (at most ``linger`` seconds), so closing
        with its data unread does not reset the connection before our answer arrives."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(0.2)
            until = time.monotonic() + linger
            while time.monotonic() < until:
                try:
                    if not self.sock.recv(1 << 16):
                        break
                except socket.timeout:
                    continue
        except OSError:
            pass
        finally:
            self.sock.close()

    def _unfinished(self) -> str:
        n = len(self.assembler.pending) if self.assembler is not None else 0
        return f" ({n} incomplete slices not reconstructed)" if n else ""

    def _refuse(self, reason: str) -> None:
        """One log line; ``ERR <reason>`` and a close to the client where the socket still takes them."""
        reason = " ".join(reason.split())
        log.warning(f"{self.who}: ERR {reason}")
        try:
            self.writer.text(f"ERR {reason}")
            self.writer.close()
        except OSError:
            pass

    def _serve(self, reader: MessageReader) -> None:
        while True:
            msg = reader.next()
            if msg.kind in (CONFIG_FILE, CONFIG_TEXT, TEXT, WAVEFORM):
                continue  # the config names a recon on other servers; this one runs its model
            if msg.kind == HEADER:
                if self.encoding is not None:
                    raise ProtocolError("a second XML header in one stream")
                _, self.encoding = parse_header(msg.value)
                self.assembler = SliceAssembler(self.encoding)
                continue
            if msg.kind == ACQUISITION:
                for key in self.assembler.add(msg.value):
                    self._reconstruct(self.assembler.take(key), time.perf_counter())
                continue
            if msg.kind == IMAGE:
                raise ProtocolError("an image sent to a raw-data reconstruction server")
            if msg.kind == CLOSE:
                if self.assembler is not None:
                    for key in self.assembler.pending:
                        self._reconstruct(self.assembler.take(key), time.perf_counter())
                self.writer.close()
                return

    def _reconstruct(self, raw: RawSlice, t_complete: float) -> None:
        enc = self.encoding
        item = SliceItem(kspace=torch.from_numpy(raw.kspace), mask=torch.from_numpy(raw.mask), smaps=None,
                           target=torch.zeros(1, 1), has_target=False, maxval=0.0, recon_size=enc.recon,
                           fname=f"stream{self.number}", slice=raw.key[0], coil_maps=self.maps)  # type: ignore[typeddict-item]
        batch = make_batch(collate([item]), 6, 0.08, None)  # the slice's own mask: no sampling to choose
        t_maps = time.perf_counter()
        model = self.server.model
        x, record, waited, loop = model.solve(batch)
        magnitude = recon_magnitude(x, enc.recon).numpy()[0]
        latency = time.perf_counter() - t_complete
        meta = {"SpadeModel": model.name, "SpadeCheckpointSHA256": model.sha256,
                "SpadeEngine": model.engine[tuple(raw.kspace.shape[-2:])],
                "SpadeLatencyMs": f"{latency * 1000:.1f}", "SpadeMapsMs": f"{(t_maps - t_complete) * 1000:.1f}",
                "SpadeReconMs": f"{loop * 1000:.1f}", "SpadeQueueMs": f"{waited * 1000:.1f}"}
        if record:
            meta.update(SpadeIterations=record["iterations"], SpadeConverged=int(record["converged"]),
                        SpadeResidual=f"{record['residual']:.3e}")
        image = make_image(magnitude, raw.reference, enc, self.images + 1, pixels=self.server.config.pixels, meta=meta)
        self.writer.image(image)
        self.images += 1
        self.latencies.append(latency)


# ------------------------------------------------------------------------------------------------
class MRDServer:
    """Accepts connections and serves each in its own thread until :meth:`stop`."""

    def __init__(self, model: DeployedModel, config: ServeConfig):
        self.model, self.config = model, config
        self.stopping = threading.Event()
        self.deadline: list[float] = []  # set on stop: when busy connections are cut at a message boundary
        self._threads: list[tuple[threading.Thread, _Connection]] = []
        self._count = 0
        self.listener: socket.socket | None = None

    def bind(self) -> tuple[str, int]:
        cfg = self.config
        try:
            self.listener = socket.create_server((cfg.host, cfg.port), backlog=64)
        except OSError as exc:
            raise SpadeError(f"cannot listen on {cfg.host}:{cfg.port} ({exc.strerror or exc})") from None
        self.listener.settimeout(0.2)
        host, port = self.listener.getsockname()[:2]
        return host, port

    def stop(self) -> None:
        if not self.stopping.is_set():
            self.deadline.append(time.monotonic() + self.config.grace)
            self.stopping.set()

    def _start(self, sock: socket.socket, addr) -> None:
        self._threads = [(t, c) for t, c in self._threads if t.is_alive()]
        self._count += 1
        conn = _Connection(self, sock, addr, self._count)
        if len(self._threads) >= self.config.max_connections:
            busy = f"the server is busy ({self.config.max_connections} connections at once)"
            threading.Thread(target=lambda: (conn._refuse(busy), conn._close()), daemon=True).start()
            return
        t = threading.Thread(target=conn.run, name=f"mrd-{self._count}", daemon=True)
        t.start()
        self._threads.append((t, conn))

    def _join(self) -> None:
        """Wait for the connections until the grace period after the stop ends; then cut the
        sockets of those still busy (a client that neither sends nor reads) and wait for them."""
        for t, _ in self._threads:
            t.join(max(0.0, self.deadline[0] - time.monotonic()) if self.deadline else None)
        for t, conn in self._threads:
            if t.is_alive():
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                t.join()

    def serve_forever(self) -> int:
        """Serve until :meth:`stop`; then serve the connections already made up to their
        complete slices, and return the number of connections served."""
        assert self.listener is not None, "bind() first"
        while not self.stopping.is_set():
            try:
                sock, addr = self.listener.accept()
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                raise
            self._start(sock, addr)
        self.listener.setblocking(False)  # connections already queued are served too
        while True:
            try:
                sock, addr = self.listener.accept()
            except OSError:
                break
            self._start(sock, addr)
        self.listener.close()
        self._join()
        return self._count


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _warm_up_maps(params: EspiritParams, shape: tuple[int, int]) -> None:
    """One ESPIRiT calibration on synthetic k-space, so the first slice served does not pay for
    importing and first running sigpy (a second on the 2-core CPU)."""
    y, _ = synthetic_sample(*shape)
    w = shape[1]
    _StreamMaps(params)(y[0].numpy(), centre_block(w, max(0.08, 8 / w)))


def parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SpadeError(f"--size {text!r}: expected HxW (readout samples x lines), e.g. 160x160") from None
    if not (2 <= h <= 65535 and 2 <= w <= 65535):
        raise SpadeError(f"--size {text!r}: each side must lie in [2, 65535]")
    return h, w


def serve(checkpoint: Path, config: ServeConfig, on_ready=None) -> int:
    """``spade serve``: load and deploy the model, warm it up for every ``config.sizes``, listen,
    log the readiness line and serve until SIGTERM / SIGINT (handlers installed while serving,
    in the main thread). ``on_ready(host, port)`` is called once listening. Returns the number
    of connections served."""
    if config.pixels not in PIXELS:
        raise SpadeError(f"--pixels {config.pixels!r} is not one of: {', '.join(PIXELS)}")
    if not 0 <= config.port <= 65535:
        raise SpadeError(f"--port {config.port} is not a TCP port (0 to 65535; 0: any free port)")
    model = DeployedModel(Path(checkpoint), config.backend, config.device, config.engines)
    server = MRDServer(model, config)
    host, port = server.bind()  # before the warm-up: a port in use fails at once
    try:
        engines = {shape: model.prepare(shape) for shape in config.sizes}
        _warm_up_maps(config.espirit, config.sizes[0] if config.sizes else (160, 160))
    except BaseException:
        server.listener.close()
        raise
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: server.stop())
    try:
        sizes = ", ".join(f"{e} at {h}x{w}" for (h, w), e in engines.items())
        log.info(f"ready: listening on {host}:{port} ({model.name}, checkpoint sha256 {model.sha256[:12]}, "
                 f"{sizes} on {config.device}; images {config.pixels})")
        if on_ready is not None:
            on_ready(host, port)
        served = server.serve_forever()
        log.info(f"stopped after {_count(served, 'connection')}")
        return served
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


__all__ = ["DEFAULT_PORT", "ServeConfig", "DeployedModel", "MRDServer", "serve", "parse_size"]
