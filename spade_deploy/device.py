"""Device placement: every batch goes to the device of the model it meets, never the other way.

A model lives where its caller put it (its first parameter or buffer says where); the batch is
moved to it at the point where it is made, so evaluation, training, fine-tuning, benchmarking and
reconstruction run wherever the model is. Models are never moved in place for a batch.

Also here: the one-line refusals of GPU-only requests on a machine without one, and the TF32
switch (off unless asked, so "FP32" on a GPU means FP32).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from .errors import SpadeError


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (else buffer); CPU for a module with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` on ``device``: tensors and modules (the measurement operator), dataclasses (a
    :class:`~spade_deploy.tasks.Batch`) field by field, lists / tuples / dicts item by item.
    Anything else is returned as it is; nothing already there is copied."""
    device = torch.device(device)
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True) if obj.device != device else obj
    if isinstance(obj, nn.Module):
        return obj.to(device) if model_device(obj) != device else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def on_model_device(obj: Any, model: nn.Module) -> Any:
    """``obj`` (a batch, a tensor, an operator) moved to the device ``model`` lives on."""
    return to_device(obj, model_device(model))


def placed(model: nn.Module, device: torch.device | str) -> nn.Module:
    """``model`` itself when it already lives on ``device``, else a copy there (the caller's model
    is never moved in place)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if model_device(model) == device:
        return model
    return copy.deepcopy(model).to(device)


def require_device(device: str | torch.device, allow_tf32: bool = False) -> torch.device:
    """``device`` as a torch device, or a one-line error when it cannot run here. On CUDA, TF32
    is switched to ``allow_tf32`` (off by default: see :func:`set_tf32`)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise SpadeError(f"unknown device {device!r} (cpu | cuda | cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SpadeError(f"--device {device}: no CUDA GPU is visible here (torch {torch.__version__}"
                             f"{', built without CUDA' if torch.version.cuda is None else ''})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SpadeError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
        set_tf32(allow_tf32)
    elif dev.type != "cpu":
        raise SpadeError(f"unsupported device {device!r} (cpu | cuda | cuda:N)")
    return dev


def set_tf32(allow: bool = False) -> None:
    """TF32 matrix products and convolutions on Ampere+ GPUs: off unless asked. With TF32 on,
    an "FP32" prior computes with a 10-bit mantissa, which can floor a DEQ's fixed-point residual
    above its tolerance (a bf16 prior, 8 bits, floors at ~3e-3 against tol 1e-4)."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


__all__ = ["model_device", "placed", "to_device", "on_model_device", "require_device", "set_tf32"]
