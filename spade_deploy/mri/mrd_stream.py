"""The MRD (ISMRMRD v1) streaming protocol over a TCP socket, as the scanner interfaces (FIRE), the
open-source MRD client / server pair (python-ismrmrd-server) and the ``ismrmrd`` package's
``ProtocolSerializer`` frame it: every message is a little-endian ``uint16`` id and its payload.

====  ==================  ===============================================================
id    message             payload
====  ==================  ===============================================================
1     config file         1024 bytes: a NUL-padded UTF-8 name
2     config text         ``uint32`` length, UTF-8 text (NUL-terminated)
3     XML header          ``uint32`` length, the ISMRMRD XML header (NUL-terminated)
4     close               none: all data of this side is sent
5     text                ``uint32`` length, UTF-8 text (NUL-terminated); ``ERR…`` an error
1008  acquisition         340-byte acquisition header, trajectory, samples (``ismrmrd``)
1022  image               198-byte image header, ``uint64`` attribute length, the
                          MetaContainer XML, pixels (``ismrmrd``)
1026  waveform            240-byte waveform header, samples (``ismrmrd``)
====  ==================  ===============================================================

Acquisitions, images and waveforms are (de)serialised by the ``ismrmrd`` package itself; this
module reads exactly the bytes each message states (bounded: no length a peer sends is allocated
unchecked) and tells a peer that closed the connection (:class:`StreamEnded`, mid-message or
between messages) from a malformed message (:class:`ProtocolError`).
"""

from __future__ import annotations

import ctypes
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import ismrmrd

from ..errors import SpadeError

CONFIG_FILE, CONFIG_TEXT, HEADER, CLOSE, TEXT = 1, 2, 3, 4, 5
ACQUISITION, IMAGE, WAVEFORM = 1008, 1022, 1026
NAMES = {CONFIG_FILE: "config file", CONFIG_TEXT: "config text", HEADER: "XML header", CLOSE: "close",
         TEXT: "text", ACQUISITION: "acquisition", IMAGE: "image", WAVEFORM: "waveform"}
CONFIG_FILE_BYTES = 1024
MAX_TEXT_BYTES = 16 << 20  # a text, config or header message
MAX_READ_BYTES = 1 << 30  # any one payload (an acquisition of 65535 samples x 1024 channels is 512 MiB)

_ID = struct.Struct("<H")
_LEN = struct.Struct("<I")
ACQ_HEADER_BYTES = ctypes.sizeof(ismrmrd.AcquisitionHeader)  # 340
IMAGE_HEADER_BYTES = ctypes.sizeof(ismrmrd.ImageHeader)  # 198


class ProtocolError(SpadeError):
    """A message that breaks the protocol (unknown id, impossible length, unreadable payload)."""


class StreamEnded(ProtocolError):
    """The peer closed (or reset) the connection; ``mid_message``: inside a message."""

    def __init__(self, text: str, mid_message: bool):
        super().__init__(text)
        self.mid_message = mid_message


class Stopping(Exception):
    """The server is stopping and no message was under way."""


@dataclass
class Message:
    kind: int
    value: Any  # str (config / header / text), None (close), ismrmrd.Acquisition / Image / Waveform

    @property
    def name(self) -> str:
        return NAMES.get(self.kind, str(self.kind))


class MessageReader:
    """Messages from a socket, one at a time (:meth:`next`).

    ``stop``: while it is set and no message is under way, :meth:`next` raises :class:`Stopping`
    once the peer has been silent for ``poll`` seconds, or at the next message once the time in
    ``deadline[0]`` (if any) has passed. ``idle_timeout``: that long without a byte is a
    :class:`ProtocolError`. ``check_acquisition(head)`` sees each acquisition header before its
    samples are read and may refuse it (raising)."""

    def __init__(self, sock: socket.socket, stop: threading.Event | None = None, idle_timeout: float | None = None,
                 poll: float = 0.5, check_acquisition: Callable[[ismrmrd.AcquisitionHeader], None] | None = None,
                 max_read: int = MAX_READ_BYTES, deadline: list[float] | None = None):
        self.sock = sock
        self.stop = stop
        self.deadline = deadline if deadline is not None else []
        self.idle_timeout = idle_timeout
        self.poll = poll
        self.check_acquisition = check_acquisition
        self.max_read = max_read
        self.received = 0  # messages
        self._in_message = False
        sock.settimeout(poll if (stop is not None or idle_timeout is not None) else None)

    def read_exactly(self, n: int) -> bytes:
        if n < 0 or n > self.max_read:
            raise ProtocolError(f"a message states a payload of {n:,} bytes (at most {self.max_read:,} accepted)")
        buf = bytearray(n)
        view, got, quiet_since = memoryview(buf), 0, time.monotonic()
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except (socket.timeout, BlockingIOError):
                if self.stop is not None and self.stop.is_set() and not self._in_message and got == 0:
                    raise Stopping() from None
                if self.idle_timeout is not None and time.monotonic() - quiet_since > self.idle_timeout:
                    raise ProtocolError(f"no data for {self.idle_timeout:g} s") from None
                continue
            except OSError as exc:  # reset, broken pipe
                raise StreamEnded(f"connection lost ({exc.strerror or type(exc).__name__})",
                                  self._in_message or got > 0) from None
            if k == 0:
                mid = self._in_message or got > 0
                raise StreamEnded("the client closed the connection" + (" in the middle of a message" if mid else ""),
                                  mid)
            got += k
            quiet_since = time.monotonic()
        return bytes(buf)

    def _text(self, kind: int) -> str:
        (length,) = _LEN.unpack(self.read_exactly(_LEN.size))
        if length > MAX_TEXT_BYTES:
            raise ProtocolError(f"a {NAMES[kind]} message of {length:,} bytes (at most {MAX_TEXT_BYTES:,} accepted)")
        raw = self.read_exactly(length).split(b"\0", 1)[0]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"a {NAMES[kind]} message that is not UTF-8 text") from None

    def next(self) -> Message:
        """The next message (:class:`StreamEnded` when the peer closed the connection first)."""
        self._in_message = False
        if self.stop is not None and self.stop.is_set() and self.deadline and time.monotonic() > self.deadline[0]:
            raise Stopping()
        (kind,) = _ID.unpack(self.read_exactly(_ID.size))
        self._in_message = True
        try:
            value = self._payload(kind)
        finally:
            self._in_message = False
        self.received += 1
        return Message(kind, value)

    def _payload(self, kind: int):
        if kind == CONFIG_FILE:
            raw = self.read_exactly(CONFIG_FILE_BYTES).split(b"\0", 1)[0]
            return raw.decode("utf-8", "replace")
        if kind in (CONFIG_TEXT, HEADER, TEXT):
            return self._text(kind)
        if kind == CLOSE:
            return None
        if kind == ACQUISITION:
            head_bytes = self.read_exactly(ACQ_HEADER_BYTES)
            head = ismrmrd.AcquisitionHeader.from_buffer_copy(head_bytes)
            if self.check_acquisition is not None:
                self.check_acquisition(head)
            return ismrmrd.Acquisition.deserialize_from(_Prefixed(head_bytes, self.read_exactly))
        if kind == IMAGE:
            head_bytes = self.read_exactly(IMAGE_HEADER_BYTES)
            head = ismrmrd.ImageHeader.from_buffer_copy(head_bytes)
            try:
                itemsize = ismrmrd.image.get_dtype_from_data_type(head.data_type).itemsize
            except TypeError:
                raise ProtocolError(f"an image of unknown data type {head.data_type}") from None
            size = head.channels * head.matrix_size[0] * head.matrix_size[1] * head.matrix_size[2] * itemsize
            if size > self.max_read:
                raise ProtocolError(f"an image of {size:,} bytes (at most {self.max_read:,} accepted)")
            try:
                return ismrmrd.Image.deserialize_from_with_header(head_bytes, _ImageReads(self.read_exactly))
            except (ValueError, AssertionError, UnicodeDecodeError, SyntaxError) as exc:  # ET.ParseError: SyntaxError
                raise ProtocolError(f"an image whose attributes are not an ISMRMRD MetaContainer ({exc})") from None
        if kind == WAVEFORM:
            return ismrmrd.Waveform.deserialize_from(self.read_exactly)
        raise ProtocolError(f"unknown message id {kind}")



class _ImageReads:
    """``read_exactly`` for an image after its header: the attribute length, the attributes
    (bounded like a text message), the pixels (bounded by the caller from the header)."""

    def __init__(self, read: Callable[[int], bytes]):
        self.read, self.calls = read, 0

    def __call__(self, n: int) -> bytes:
        self.calls += 1
        if self.calls == 2 and n > MAX_TEXT_BYTES:
            raise ProtocolError(f"image attributes of {n:,} bytes (at most {MAX_TEXT_BYTES:,} accepted)")
        return self.read(n)


class _Prefixed:
    """``read_exactly`` that first hands back bytes already read (an acquisition header seen
    before its samples)."""

    def __init__(self, first: bytes, read: Callable[[int], bytes]):
        self.first, self.read = first, read

    def __call__(self, n: int) -> bytes:
        if self.first is not None:
            first, self.first = self.first, None
            if n != len(first):
                raise ProtocolError("acquisition header read out of step")
            return first
        return self.read(n)


def _text_payload(kind: int, text: str) -> bytes:
    raw = text.encode("utf-8") + b"\0"  # the documented NUL-terminated text
    return _ID.pack(kind) + _LEN.pack(len(raw)) + raw


class MessageWriter:
    """Messages to a socket; one writer per connection, safe to share between threads. A socket
    with a (short, polling) timeout is written to until ``timeout`` seconds pass without the peer
    taking a byte."""

    def __init__(self, sock: socket.socket, timeout: float = 300.0):
        self.sock = sock
        self.timeout = timeout
        self._lock = threading.Lock()
        self.sent = 0

    def _send(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            stalled_since = time.monotonic()
            while view:
                try:
                    n = self.sock.send(view)
                except (socket.timeout, BlockingIOError):
                    if time.monotonic() - stalled_since > self.timeout:
                        raise
                    continue
                view = view[n:]
                stalled_since = time.monotonic()
            self.sent += 1

    def config_file(self, name: str) -> None:
        raw = name.encode("utf-8")
        if len(raw) >= CONFIG_FILE_BYTES:
            raise SpadeError(f"config name of {len(raw)} bytes (at most {CONFIG_FILE_BYTES - 1})")
        self._send(_ID.pack(CONFIG_FILE) + raw.ljust(CONFIG_FILE_BYTES, b"\0"))

    def config_text(self, text: str) -> None:
        self._send(_text_payload(CONFIG_TEXT, text))

    def header(self, xml: str) -> None:
        self._send(_text_payload(HEADER, xml))

    def text(self, text: str) -> None:
        self._send(_text_payload(TEXT, text))

    def acquisition(self, acq: ismrmrd.Acquisition) -> None:
        self._send(_ID.pack(ACQUISITION) + acq.to_bytes())

    def image(self, image: ismrmrd.Image) -> None:
        self._send(_ID.pack(IMAGE) + image.to_bytes())

    def close(self) -> None:
        self._send(_ID.pack(CLOSE))
