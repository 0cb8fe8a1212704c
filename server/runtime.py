"""onnxruntime execution: which provider to use, and one encoder session per model version.

`choose_providers` is the only place that decides CUDA vs CPU. CUDA is chosen only when
onnxruntime offers it and a device is really usable (`cuda_usable`: `aet.devices`' rule, an
NVIDIA device node and `nvidia-smi -L` listing a GPU, then `onnxruntime.preload_dlls()`); otherwise
CPU, silently. The provider a session really uses is read back from onnxruntime.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from aet.devices import DEVICES, nvidia_device_node_present, nvidia_gpu_present
from aet.errors import UserError

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
_ORT_ERROR_ONLY = 3  # onnxruntime log severity: errors and fatal only

log = logging.getLogger(__name__)


class ModelLoadError(Exception):
    """onnxruntime could not load a model, or its graph does not match its model card."""


class DeviceError(UserError):
    """`--device cuda` was asked for but no CUDA device is usable."""


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions run: device preference and onnxruntime thread pools (0 = its default)."""

    device: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 0


def choose_providers(available: list[str], cuda_usable: bool) -> list[str]:
    """Execution providers in priority order: CUDA then CPU when CUDA is usable, else CPU."""
    if cuda_usable and CUDA_PROVIDER in available:
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def cuda_usable(available: list[str]) -> bool:
    """True when onnxruntime has the CUDA provider and a GPU with its libraries is there."""
    if CUDA_PROVIDER not in available:
        return False
    if not nvidia_gpu_present():
        return False
    # preload_dlls reports missing libraries by printing; keep that out of the server's output.
    with contextlib.redirect_stdout(io.StringIO()):
        ort.preload_dlls()
    return True


def resolve_providers(device: str) -> list[str]:
    """The providers for `device` ("auto", "cpu" or "cuda") on this machine."""
    if device not in DEVICES:
        raise DeviceError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    available = ort.get_available_providers()
    if device == "cpu":
        return choose_providers(available, cuda_usable=False)
    usable = cuda_usable(available)
    if device == "cuda" and not usable:
        raise DeviceError(
            f"device: expected a usable CUDA GPU for 'cuda', got none (onnxruntime providers: "
            f"{', '.join(available)}; NVIDIA device node present: "
            f"{nvidia_device_node_present()})"
        )
    return choose_providers(available, usable)


class EncoderSession:
    """One `onnxruntime.InferenceSession` for an encoder: (rows, ...) float32 -> (rows, dim)."""

    def __init__(
        self,
        model_path: Path,
        input_name: str,
        output_name: str,
        row_shape: tuple[int, ...],
        providers: list[str],
        options: RuntimeOptions,
        label: str | None = None,
    ):
        """`label` names the model in errors (default: its path; the server passes
        `<model>/<version>/model.onnx`, as errors reach clients)."""
        label = str(model_path) if label is None else label
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.log_severity_level = _ORT_ERROR_ONLY
        try:
            self._session = ort.InferenceSession(
                str(model_path), session_options, providers=providers
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            reason = str(exc).replace(str(model_path), label)  # no server path in the message
            raise ModelLoadError(f"{label}: onnxruntime cannot load it: {reason}") from exc
        self._check_signature(label, input_name, output_name, row_shape)
        self.input_name = input_name
        self.output_name = output_name
        self.provider = self._session.get_providers()[0]
        # IO binding pays on a GPU (outputs land straight in host memory, no extra staging);
        # on CPU the plain `run` already works on the numpy buffers. A binding holds one run's
        # tensors, so each thread that runs batches (model instances) has its own.
        self._uses_binding = self.provider == CUDA_PROVIDER
        self._bindings = threading.local()

    def _check_signature(
        self, label: str, input_name: str, output_name: str, row_shape: tuple[int, ...]
    ) -> None:
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        if input_name not in inputs:
            raise ModelLoadError(
                f"{label}: input: expected {input_name!r} (model card), got {sorted(inputs)}"
            )
        if output_name not in outputs:
            raise ModelLoadError(
                f"{label}: output: expected {output_name!r} (model card), got {sorted(outputs)}"
            )
        graph_rows = tuple(inputs[input_name].shape[1:])
        if len(graph_rows) != len(row_shape) or any(
            isinstance(g, int) and g != c for g, c in zip(graph_rows, row_shape, strict=True)
        ):
            raise ModelLoadError(
                f"{label}: input shape: expected [batch, "
                f"{', '.join(map(str, row_shape))}] (model card), "
                f"got {inputs[input_name].shape}"
            )

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Embeddings (rows, dim) of a float32 batch (rows, ...); callers may run at once."""
        if not self._uses_binding:
            return self._session.run((self.output_name,), {self.input_name: batch})[0]
        binding = getattr(self._bindings, "binding", None)
        if binding is None:
            binding = self._bindings.binding = self._session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        binding.bind_output(self.output_name, "cpu")
        self._session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def warm_up(self, row_shape: tuple[int, ...], batch_sizes: tuple[int, ...]) -> None:
        """Run zeros at each batch size so allocations and kernel choices happen before serving."""
        for rows in batch_sizes:
            self.run(np.zeros((rows, *row_shape), dtype=np.float32))
