"""``spade send``: stream an ISMRMRD raw file to an MRD server and keep the images it returns.

What the open-source MRD client does, in the package: connect, send a config file name, the
file's XML header as it is, every acquisition in file order (noise scans and all: the server
decides what to use) and a close message, while a second thread receives the server's images and
text messages until its close. The images are written as an MRD image file (``/dataset/xml``,
``/dataset/image_<series>``) only when the server reported no error (a text message starting
``ERR``) and closed the stream properly; otherwise nothing is written and the error is raised.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ismrmrd

from ..errors import SpadeError
from ..paths import check_outputs
from .images import write_mrd_images
from .ismrmrd_raw import acquisitions
from .mrd_stream import CLOSE, IMAGE, TEXT, MessageReader, MessageWriter, ProtocolError, StreamEnded


@dataclass
class SendResult:
    output: Path
    images: list[ismrmrd.Image]
    texts: list[str]
    acquisitions: int
    seconds: float  # connect to the server's close
    image_seconds: list[float] = field(default_factory=list)  # each image's arrival after connecting


class _Receiver(threading.Thread):
    def __init__(self, sock: socket.socket, t0: float):
        super().__init__(name="mrd-receive", daemon=True)
        self.reader = MessageReader(sock)
        self.t0 = t0
        self.images: list[ismrmrd.Image] = []
        self.image_seconds: list[float] = []
        self.texts: list[str] = []
        self.closed = False
        self.error: str | None = None

    def run(self) -> None:
        try:
            while True:
                msg = self.reader.next()
                if msg.kind == IMAGE:
                    self.images.append(msg.value)
                    self.image_seconds.append(time.perf_counter() - self.t0)
                elif msg.kind == TEXT:
                    self.texts.append(msg.value)
                elif msg.kind == CLOSE:
                    self.closed = True
                    return
                else:
                    raise ProtocolError(f"the server sent a {msg.name} message")
        except StreamEnded as exc:
            self.error = f"the server ended the connection without a close message ({exc})"
        except (ProtocolError, OSError) as exc:
            self.error = f"unreadable answer from the server: {exc}"


def send_file(raw: str | Path, out: str | Path, host: str = "127.0.0.1", port: int = 9002, timeout: float = 600.0,
              config: str = "spade") -> SendResult:
    """Stream ``raw`` to the MRD server at ``host:port`` and write the images to ``out``."""
    raw, out = Path(raw), Path(out)
    if not 1 <= port <= 65535:
        raise SpadeError(f"--port {port} is not a TCP port (1 to 65535)")
    if not timeout > 0:
        raise SpadeError(f"--timeout must be positive, got {timeout!r}")
    if not raw.is_file():
        raise SpadeError(f"raw data file {raw} does not exist")
    check_outputs(files=[out], inputs=[raw], data=[raw.parent])
    if out.is_dir():
        raise SpadeError(f"output path {out} is a folder, expected a file")
    xml, acqs = acquisitions(raw)
    t0 = time.perf_counter()
    try:
        sock = socket.create_connection((host, port), timeout=min(timeout, 30.0))
    except OSError as exc:
        raise SpadeError(f"cannot connect to {host}:{port} ({exc.strerror or exc})") from None
    sock.settimeout(None)
    receiver = _Receiver(sock, t0)
    receiver.start()
    writer = MessageWriter(sock, timeout=timeout)
    sent = 0
    try:
        writer.config_file(config)
        writer.header(xml)
        for acq in acqs:
            writer.acquisition(acq)
            sent += 1
        writer.close()
    except OSError:
        pass  # the server stopped reading (an error it reports below, or a lost connection)
    receiver.join(timeout)
    if receiver.is_alive():
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        receiver.join(5.0)
    sock.close()
    seconds = time.perf_counter() - t0
    errors = [t for t in receiver.texts if t.startswith("ERR")]
    if errors:
        raise SpadeError(f"the server at {host}:{port} refused the stream: {errors[0]}")
    if receiver.is_alive() or not receiver.closed:
        why = receiver.error or f"no close message within {timeout:g} s"
        raise SpadeError(f"{why}; {len(receiver.images)} images received, {sent} of {len(acqs)} acquisitions sent")
    if not receiver.images:
        raise SpadeError(f"the server at {host}:{port} sent no image for {raw}")
    write_mrd_images(out, xml, receiver.images)
    return SendResult(output=out, images=receiver.images, texts=receiver.texts, acquisitions=len(acqs),
                      seconds=seconds, image_seconds=receiver.image_seconds)
