"""onnxruntime execution: which provider to use, and one encoder session per model version.

An exported graph may have a second output, the novelty score `reconstruction_error`, which
needs the decoder. onnxruntime runs every node of a graph whatever outputs a run asks for, so
`EncoderSession` keeps the graph cut down to the embedding (`embedding_graph`) for embedding
requests, which then cost what the encoder alone costs, and the whole graph for scored ones.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort

from aet.config import ConfigError
from aet.devices import DEVICES, nvidia_device_node_present, nvidia_gpu_present
from aet.errors import UserError
from aet.repository import ModelCard

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
_ORT_ERROR_ONLY = 3  # onnxruntime log severity: errors and fatal only

log = logging.getLogger(__name__)


class ModelLoadError(UserError):
    """onnxruntime could not load a model, or its graph does not match its model card."""


class DeviceError(UserError):
    """`--device cuda` was asked for but no CUDA device is usable."""


@dataclass(frozen=True)
class RuntimeOptions:
    """How sessions run: device preference and onnxruntime thread pools (0 = its default)."""

    device: str = field(
        default="auto",
        metadata={
            "help": "execution device: auto uses CUDA only when a GPU is really usable",
            "choices": list(DEVICES),
        },
    )
    intra_op_threads: int = field(
        default=0,
        metadata={"help": "onnxruntime threads inside one operator per session (0: one per core)"},
    )
    inter_op_threads: int = field(
        default=0,
        metadata={"help": "onnxruntime threads across operators per session (0: its default)"},
    )

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device: expected one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("intra_op_threads", "inter_op_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected 0 or more, got {getattr(self, name)}")


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


def embedding_graph(model: onnx.ModelProto, input_name: str, output_name: str) -> bytes:
    """The serialized graph cut down to the nodes `output_name` needs (the graph itself if
    that is its only output)."""
    if [o.name for o in model.graph.output] == [output_name]:
        return model.SerializeToString()
    return (
        onnx.utils.Extractor(model).extract_model([input_name], [output_name]).SerializeToString()
    )


Outputs = dict[str, np.ndarray]  # output name -> (rows, ...) array, e.g. {"embedding": ...}


class EncoderSession:
    """onnxruntime sessions for an encoder: a float32 batch (rows, ...) in, named outputs
    out: `output_name` (rows, dim) alone, or with the score output `score_name` (rows,) when
    the graph has it and it was asked for (`outputs`)."""

    def __init__(
        self,
        model_path: Path,
        input_name: str,
        output_name: str,
        row_shape: tuple[int, ...],
        providers: list[str],
        options: RuntimeOptions,
        score_name: str | None = None,
        label: str | None = None,
        embedding_dim: int | None = None,
    ):
        """`label` names the model in errors (default: its path; the server passes
        `<model>/<version>/model.onnx`, as errors reach clients); `embedding_dim`, when given
        (the card's), must match the graph's output."""
        label = str(model_path) if label is None else label
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.log_severity_level = _ORT_ERROR_ONLY
        try:
            model = onnx.load(str(model_path))
        except Exception as exc:  # onnx raises protobuf's DecodeError, OSError, ...
            reason = str(exc).replace(str(model_path), label)  # no server path in the message
            raise ModelLoadError(f"{label}: onnxruntime cannot load it: {reason}") from exc
        self._check_signature(label, model, input_name, (output_name, score_name), row_shape)
        if embedding_dim is not None:
            self._check_output_dim(label, model, output_name, embedding_dim)
        self.input_name = input_name
        self.output_name = output_name
        self.embedding_outputs: tuple[str, ...] = (output_name,)
        # The output sets a run may ask for, each with its own session: the embedding alone
        # from the graph cut down to the encoder, the score beside it from the whole graph.
        self.output_sets: tuple[tuple[str, ...], ...] = (
            (self.embedding_outputs,)
            if score_name is None
            else (self.embedding_outputs, (output_name, score_name))
        )
        try:
            self._sessions: dict[tuple[str, ...], ort.InferenceSession] = {
                names: ort.InferenceSession(
                    embedding_graph(model, input_name, output_name)
                    if names == self.embedding_outputs
                    else model.SerializeToString(),
                    session_options,
                    providers=providers,
                )
                for names in self.output_sets
            }
        except Exception as exc:  # onnx and onnxruntime raise their own error types
            reason = str(exc).replace(str(model_path), label)
            raise ModelLoadError(f"{label}: onnxruntime cannot load it: {reason}") from exc
        self.provider = self._sessions[self.embedding_outputs].get_providers()[0]
        # IO binding pays on a GPU (outputs land straight in host memory, no extra staging);
        # on CPU the plain `run` already works on the numpy buffers. A binding holds one run's
        # tensors, so each thread that runs batches (model instances) has its own.
        self._uses_binding = self.provider == CUDA_PROVIDER
        self._bindings = threading.local()

    @classmethod
    def from_card(
        cls,
        model_path: Path,
        card: ModelCard,
        providers: list[str],
        options: RuntimeOptions,
        *,
        score: bool,
        label: str | None = None,
    ) -> EncoderSession:
        """The session of a model as its card describes it (input, output, row shape), with
        the novelty score when `score` and the graph has one: the one way a card is opened."""
        return cls(
            model_path,
            card.input.name,
            card.output.name,
            tuple(card.input.shape),
            providers,
            options,
            score_name=card.score.name if score and card.score is not None else None,
            label=label,
            embedding_dim=card.output.embedding_dim,
        )

    @staticmethod
    def _check_signature(
        label: str,
        model: onnx.ModelProto,
        input_name: str,
        output_names: tuple[str | None, ...],
        row_shape: tuple[int, ...],
    ) -> None:
        inputs = {i.name: i for i in model.graph.input}
        outputs = {o.name for o in model.graph.output}
        if input_name not in inputs:
            raise ModelLoadError(
                f"{label}: input: expected {input_name!r} (model card), got {sorted(inputs)}"
            )
        for output_name in filter(None, output_names):
            if output_name not in outputs:
                raise ModelLoadError(
                    f"{label}: output: expected {output_name!r} (model card), got {sorted(outputs)}"
                )
        dims = inputs[input_name].type.tensor_type.shape.dim
        graph_rows = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
        graph_rows = graph_rows[1:]
        if len(graph_rows) != len(row_shape) or any(
            isinstance(g, int) and g != c for g, c in zip(graph_rows, row_shape, strict=True)
        ):
            raise ModelLoadError(
                f"{label}: input shape: expected [batch, "
                f"{', '.join(map(str, row_shape))}] (model card), "
                f"got {['batch', *graph_rows]}"
            )

    @staticmethod
    def _check_output_dim(
        label: str, model: onnx.ModelProto, output_name: str, embedding_dim: int
    ) -> None:
        """Refuse a graph whose output columns (declared, or inferred by onnx) are not the
        card's `embedding_dim`; a dimension that stays symbolic cannot be checked here."""
        for graph in (model.graph, onnx.shape_inference.infer_shapes(model).graph):
            output = next(o for o in graph.output if o.name == output_name)
            dims = [
                d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in output.type.tensor_type.shape.dim
            ]
            if len(dims) == 2 and isinstance(dims[1], int):
                if dims[1] != embedding_dim:
                    raise ModelLoadError(
                        f"{label}: output shape: expected [batch, {embedding_dim}] (model card "
                        f"output.embedding_dim), got {['batch', *dims[1:]]}"
                    )
                return

    def run(self, batch: np.ndarray, outputs: tuple[str, ...] | None = None) -> Outputs:
        """The named outputs `outputs` (one of `output_sets`; default the embedding alone) of a
        float32 batch (rows, ...); callers may run at once."""
        names = self.embedding_outputs if outputs is None else outputs
        session = self._sessions.get(names)
        if session is None:
            raise ModelLoadError(
                f"outputs: expected one of {list(self.output_sets)} (the graph's), got {names}"
            )
        if not self._uses_binding:
            return dict(zip(names, session.run(names, {self.input_name: batch}), strict=True))
        if not hasattr(self._bindings, "by_outputs"):
            self._bindings.by_outputs = {}
        bindings: dict[tuple[str, ...], ort.IOBinding] = self._bindings.by_outputs
        binding = bindings.get(names)
        if binding is None:
            binding = bindings[names] = session.io_binding()
        binding.bind_cpu_input(self.input_name, batch)
        for name in names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))

    def warm_up(self, row_shape: tuple[int, ...], batch_sizes: tuple[int, ...]) -> None:
        """Run zeros at each batch size so allocations and kernel choices happen before serving."""
        for rows in batch_sizes:
            zeros = np.zeros((rows, *row_shape), dtype=np.float32)
            for names in self.output_sets:
                self.run(zeros, names)
