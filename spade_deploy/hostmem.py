"""Host memory: keep freed activations in the process instead of handing them back to the OS.

PyTorch's CPU tensors come from ``malloc``. glibc serves every block above its mmap threshold
(128 KiB at start, raised on the fly only after such a block is freed) with a fresh ``mmap``
and returns it with ``munmap`` when freed, so each call of a prior faults its activations
(1.9-3.3 MB per 160 x 160 feature map of the small DEQ) back in, page by page, depending on
what the process ran before. ``benchmarks/host_allocator.py`` measures the difference on the small
DEQ (figures in ``benchmarks/README.md``). onnxruntime keeps its own memory arena.

:func:`keep_freed_memory` fixes the threshold at glibc's largest (32 MiB on 64-bit; larger
blocks still use ``mmap``) and stops trimming the heap top, as ``jemalloc`` / ``tcmalloc``
behave and as PyTorch's CPU performance guides recommend. The ``spade`` command calls it at
start; ``SPADE_HOST_ALLOCATOR=system`` leaves glibc's defaults (any value other than ``system``,
``kept`` or empty is refused). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from .errors import SpadeError

ENV = "SPADE_HOST_ALLOCATOR"
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 1 << 30

_state: str | None = None


def keep_freed_memory() -> str:
    """Apply the setting once per process; returns what the process runs with: ``"kept"``,
    ``"system"`` (left as it was, by ``$SPADE_HOST_ALLOCATOR`` or because this is not glibc)."""
    global _state
    if _state is not None:
        return _state
    asked = os.environ.get(ENV, "").strip().lower()
    if asked not in ("", "kept", "system"):
        raise SpadeError(f"${ENV} is {os.environ[ENV]!r}; set it to 'system' (glibc's defaults) or 'kept', or unset it")
    _state = "system"
    if asked == "system" or not sys.platform.startswith("linux"):
        return _state
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return _state
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
        _state = "kept"
    return _state


def allocator_state() -> str:
    """What :func:`keep_freed_memory` set in this process (``"system"`` if it was never called),
    recorded with every timing."""
    return _state or "system"
