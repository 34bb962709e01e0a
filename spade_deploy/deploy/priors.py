"""The modules that run a prior on an engine: eager PyTorch in channels-last memory, a CUDA graph,
an onnxruntime session, a TensorRT engine. Each is an ``nn.Module`` called like the prior it
replaces (``prior(x) -> x`` on real ``(B, C, H, W)`` tensors): the reconstructor's loop does not
change (:mod:`spade_deploy.deploy.runtime`). On CUDA, onnxruntime and TensorRT read and write
torch's device memory directly (I/O binding, tensor addresses on torch's current stream).
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..device import require_device
from ..errors import SpadeError
from ..lazy import optional
from ..solvers import current_precision


class ChannelsLastPrior(nn.Module):
    """An eager PyTorch prior with weights and input in channels-last memory (oneDNN / cuDNN's fast
    convolution path for any channel count, pruned widths included)."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = copy.deepcopy(prior).eval().to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prior(x.contiguous(memory_format=torch.channels_last))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CastPrior(nn.Module):
    """An eager prior in channels-last memory computing in ``precision`` (bf16 / fp16): weights
    and input cast, the output returned in FP32 (the outer loop stays FP32)."""

    def __init__(self, prior: nn.Module, precision: str):
        super().__init__()
        self.dtype = DTYPES[precision]
        self.prior = copy.deepcopy(prior).eval().to(dtype=self.dtype, memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prior(x.to(self.dtype).contiguous(memory_format=torch.channels_last)).float()


class PrecisionPrior(nn.Module):
    """A prior that runs ``low`` (a :class:`CastPrior`) while the solver is in the low phase of a
    precision schedule (:func:`spade_deploy.solvers.precision_phase`) and ``full`` (any FP32
    engine) otherwise, outside a solve included."""

    def __init__(self, full: nn.Module, low: nn.Module, precision: str):
        super().__init__()
        self.full, self.low, self.precision = full, low, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low(x) if current_precision() == self.precision else self.full(x)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def low_precision_support(device: str | torch.device) -> dict[str, str]:
    """The low precisions this device computes natively, each with the instruction set or
    hardware that runs it: on a CPU bf16 where it has AMX-BF16 or AVX512-BF16 (oneDNN's bf16
    kernels; elsewhere bf16 is emulated, slower than FP32), on CUDA fp16, and bf16 where supported."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        found = {"fp16": f"{name} fp16"}
        if torch.cuda.is_bf16_supported():
            found["bf16"] = f"{name} bf16"
        return found
    flags = cpu_flags()
    isa = [label for flag, label in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    return {"bf16": " + ".join(isa)} if isa else {}


def cpu_isa() -> str:
    """The instruction set PyTorch's CPU kernels use and the bf16 extensions present, e.g. ``AVX512 + AMX-BF16 + AVX512-BF16``."""
    extra = low_precision_support("cpu").get("bf16")
    return torch.backends.cpu.get_cpu_capability() + (f" + {extra}" if extra else " (no native bf16)")


class CudaGraphPrior(nn.Module):
    """A prior replayed from a CUDA graph captured once per input shape: one launch per call
    instead of one per layer. The output is copied out of the graph's static buffer (callers keep
    it, e.g. in the solver's history)."""

    def __init__(self, prior: nn.Module):
        super().__init__()
        self.prior = prior
        self._graphs: dict = {}

    @torch.no_grad()
    def _capture(self, x: torch.Tensor):
        static_in = x.clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # warm-up off the capturing stream, as capture requires
            for _ in range(2):
                self.prior(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.prior(static_in)
        return graph, static_in, static_out

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out.clone()


class OrtPrior(nn.Module):
    """A prior run by onnxruntime: CPU, or the CUDA provider with I/O binding on torch's tensors.

    On CUDA the session runs on torch's current stream (``user_compute_stream``) and is told not
    to synchronise after each run, so a call queues work like a torch operator does; the I/O
    binding object is made once and rebound per call (pointers change, the binding does not).
    Every call returns a new output tensor: callers keep earlier outputs (the solver's history)."""

    def __init__(self, onnx_path: str | Path, device: str = "cpu", input_name: str = "x", output_name: str = "y"):
        super().__init__()
        self.device = require_device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else None
        self.session = onnx_session(onnx_path, str(self.device), cuda_stream=stream)
        self._stream = stream
        self.input_name, self.output_name = input_name, output_name
        self._binding = self.session.io_binding() if self.device.type == "cuda" else None
        # the output's channel count where the graph fixes it (USRNet's prior maps image + noise
        # map, 4 channels, to the 3-channel image); None: as many as the input
        channels = next((o.shape[1] for o in self.session.get_outputs() if o.name == output_name), None)
        self._out_channels = channels if isinstance(channels, int) else None
        self._run_options = None
        if self.device.type == "cuda":
            self._run_options = optional("onnxruntime").RunOptions()
            self._run_options.add_run_config_entry("disable_synchronize_execution_providers", "1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        if self.device.type == "cpu":
            out = self.session.run([self.output_name], {self.input_name: x.detach().cpu().numpy()})[0]
            return torch.from_numpy(out).to(x.device)
        if x.device != self.device:
            raise SpadeError(f"onnxruntime session on {self.device} was given a tensor on {x.device}")
        # priors keep (B, H, W); the channels are the graph's
        y = torch.empty((x.shape[0], self._out_channels or x.shape[1], *x.shape[2:]), device=x.device, dtype=x.dtype)
        b, dev_id = self._binding, self.device.index
        b.bind_input(self.input_name, "cuda", dev_id, np.float32, tuple(x.shape), x.data_ptr())
        b.bind_output(self.output_name, "cuda", dev_id, np.float32, tuple(y.shape), y.data_ptr())
        if torch.cuda.current_stream(self.device).cuda_stream != self._stream:
            # another stream than the session's: order the two by a synchronisation
            torch.cuda.current_stream(self.device).synchronize()
            self.session.run_with_iobinding(b)
        else:
            self.session.run_with_iobinding(b, self._run_options)
        return y


class TrtPrior(nn.Module):
    """A prior run by a TensorRT engine on torch CUDA tensors (TensorRT 10 tensor API), on torch's
    current stream; shapes outside the engine's optimisation profile are a one-line error."""

    def __init__(self, engine_path: str | Path, input_name: str = "x", output_name: str = "y", device: str = "cuda"):
        super().__init__()
        trt = require_tensorrt()
        self.device = require_device(device)
        if self.device.type != "cuda":
            raise SpadeError("the tensorrt back-end runs on a CUDA GPU: use --device cuda")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(self.device):
            self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise SpadeError(f"could not load TensorRT engine {engine_path} (built by another TensorRT version or GPU?)")
            self.context = self.engine.create_execution_context()
        self.engine_path = Path(engine_path)
        self.input_name, self.output_name = input_name, output_name
        self._shape: tuple[int, ...] | None = None

    def profile_range(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        lo, _, hi = self.engine.get_tensor_profile_shape(self.input_name, 0)
        return tuple(lo), tuple(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        shape = tuple(x.shape)
        if shape != self._shape:  # shapes are set (and checked) once per new shape
            if not self.context.set_input_shape(self.input_name, shape):
                lo, hi = self.profile_range()
                raise SpadeError(f"input {shape} is outside the TensorRT engine's profile {lo} .. {hi} "
                                 f"({self.engine_path.name}); rebuild it with `spade export --trt --size` for this data")
            self._shape = shape
            self._out_shape = tuple(self.context.get_tensor_shape(self.output_name))
        y = torch.empty(self._out_shape, device=x.device, dtype=torch.float32)
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, y.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise SpadeError("TensorRT execution failed")
        return y


def onnx_session(path: str | Path, device: str = "cpu", cuda_stream: int | None = None):
    """An onnxruntime session tuned for latency inside a loop (all graph optimisations, torch's thread count, no spinning).

    ``device`` ``cuda[:N]``: the CUDA provider on device N (torch's current device by default),
    on ``cuda_stream`` when given; a session whose CUDA provider is not active is refused rather
    than left to fall back to the CPU in silence."""
    ort = optional("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    # The outer loop runs torch operators between prior calls: threads spinning after a call
    # would take the cores from them (a DEQ slice on 2 cores: 888 -> 626 ms without spinning).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers: list = ["CPUExecutionProvider"]
    dev = torch.device(device)
    if dev.type == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SpadeError("this onnxruntime is the CPU build (no CUDA provider): pip uninstall onnxruntime, "
                             "then pip install 'spade-deploy[gpu]' (onnxruntime-gpu)")
        index = dev.index if dev.index is not None else (torch.cuda.current_device() if torch.cuda.is_available() else 0)
        options = {"device_id": str(index)}
        if cuda_stream is not None:
            options.update(has_user_compute_stream="1", user_compute_stream=str(cuda_stream))
        providers.insert(0, ("CUDAExecutionProvider", options))
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if dev.type == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise SpadeError(f"onnxruntime did not start its CUDA provider for {Path(path).name} "
                         f"(active: {', '.join(session.get_providers())}); check the CUDA / cuDNN libraries onnxruntime-gpu needs")
    return session


def require_tensorrt():
    """The ``tensorrt`` module, or a one-line error saying why it cannot be used here."""
    if not torch.cuda.is_available():
        raise SpadeError("TensorRT needs a CUDA GPU, and none is visible here")
    trt = optional("tensorrt")
    if not str(trt.__version__).startswith("10."):
        raise SpadeError(f"TensorRT {trt.__version__} found; spade-deploy builds engines with TensorRT 10 (pip install 'tensorrt>=10,<11')")
    return trt
