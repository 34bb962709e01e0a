"""The optional heavy modules, imported on first use: each is the module, or a one-line
:class:`~spade_deploy.errors.SpadeError` saying what to install.

onnxruntime comes in two builds that must not be installed together (the ``cpu`` and ``gpu``
extras), TensorRT only with an NVIDIA GPU, and sigpy takes seconds to import: a command that does
not need one neither imports nor requires it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import SpadeError

# module -> (name in messages, what to install)
OPTIONAL = {
    "onnxruntime": ("onnxruntime", "pip install 'spade-deploy[cpu]' (or 'spade-deploy[gpu]' on an NVIDIA GPU, "
                                   "which brings onnxruntime-gpu)"),
    "tensorrt": ("TensorRT", "pip install 'spade-deploy[gpu]' on a machine with an NVIDIA GPU"),
    "sigpy.mri.app": ("sigpy", "pip install sigpy"),
}


def optional(module: str) -> ModuleType:
    """``module`` (one of :data:`OPTIONAL`) imported, or a one-line error naming what to install."""
    name, hint = OPTIONAL[module]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise SpadeError(f"{name} is not installed: {hint}") from None
