"""`aet triton`: one exported version as a Triton Inference Server model repository.

Triton's repository layout is ours (`<model>/<version>/model.onnx`), so a fleet that already
runs Triton can serve our encoders and heads with its onnxruntime backend. This writes

    <output>/<name>/config.pbtxt          Triton's ModelConfig, in protobuf text format
    <output>/<name>/<version>/model.onnx  the exported graph, byte for byte (sha256 checked)
    <output>/<name>/<version>/model.json  our card, for provenance (Triton ignores it)
    <output>/<name>/labels.txt            classifier heads only: one class label per line

The config names every input and output of the ONNX graph with its dtype and dims read from
the graph itself (`embedding`, `reconstruction_error`; `probabilities` for heads, with the
labels file so that Triton's classification extension answers "score:index:label" as
`aet serve` does). The batch axis is the graph's dynamic first axis; a tensor that is only
the batch axis (`reconstruction_error`, shape (N,)) is `dims: [1]` reshaped to `[]`, as
Triton requires. Dynamic batching, the largest batch and the queue follow `aet serve`'s
defaults and flags of the same names.

The version is found and its bytes checked against the card's sha256 by the repository
(`aet.repository.find_model_version`, `ModelVersion.verified_bytes`), as for every other reader.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf import text_format

from aet.config import ConfigError, add_config_arguments, config_from_args
from aet.errors import UserError
from aet.proto import model_config_pb2 as mc
from aet.repository import CARD_FILE, MODEL_FILE, find_model_version
from aet.server.models import BatchingOptions

SERVE_BATCHING = BatchingOptions()  # `aet serve`'s defaults are the Triton config's
CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
CLASSIFIER_OUTPUT = "probabilities"

# ONNX element types -> Triton data types (the ones an exported graph can carry).
DATA_TYPES: dict[int, mc.DataType] = {
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.BFLOAT16: mc.TYPE_BF16,
    onnx.TensorProto.DOUBLE: mc.TYPE_FP64,
    onnx.TensorProto.UINT8: mc.TYPE_UINT8,
    onnx.TensorProto.UINT16: mc.TYPE_UINT16,
    onnx.TensorProto.UINT32: mc.TYPE_UINT32,
    onnx.TensorProto.UINT64: mc.TYPE_UINT64,
    onnx.TensorProto.INT8: mc.TYPE_INT8,
    onnx.TensorProto.INT16: mc.TYPE_INT16,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.BOOL: mc.TYPE_BOOL,
    onnx.TensorProto.STRING: mc.TYPE_STRING,
}
KINDS = {
    "auto": mc.ModelInstanceGroup.KIND_AUTO,
    "cpu": mc.ModelInstanceGroup.KIND_CPU,
    "gpu": mc.ModelInstanceGroup.KIND_GPU,
}


class TritonError(UserError):
    """The version cannot be written as a Triton model (bad card, checksum, graph, target)."""


@dataclass
class TritonConfig:
    """Configuration of `aet triton` (flags or a TOML file with the same field names)."""

    model: Path | None = field(
        default=None,
        metadata={
            "help": "exported model folder (<repository>/<model>: its latest version) or one "
            "version folder (<repository>/<model>/<version>)"
        },
    )
    output: Path = field(
        default=Path("triton"),
        metadata={"help": "Triton model repository to write <name>/ into"},
    )
    name: str | None = field(
        default=None,
        metadata={"help": "model name in Triton (default: the name in model.json)"},
    )
    max_batch_size: int = field(
        default=SERVE_BATCHING.max_batch_size,
        metadata={"help": "Triton's max_batch_size: rows per run (0: no batching)"},
    )
    max_queue_delay_ms: float = field(
        default=SERVE_BATCHING.max_queue_delay_ms,
        metadata={"help": "dynamic batching: longest wait for requests to join a batch"},
    )
    max_queue_size: int = field(
        default=SERVE_BATCHING.max_queue_size,
        metadata={"help": "dynamic batching: requests that may wait; beyond it Triton refuses"},
    )
    model_instances: int = field(
        default=SERVE_BATCHING.model_instances,
        metadata={"help": "instance_group count: copies of the model that run at once"},
    )
    instance_kind: str = field(
        default="auto",
        metadata={
            "help": "instance_group kind: auto (Triton picks GPU when it has one), cpu or gpu",
            "choices": list(KINDS),
        },
    )

    def __post_init__(self) -> None:
        if self.model is None:
            raise ConfigError("model: expected an exported model or version folder, got none")
        if self.max_batch_size < 0:
            raise ConfigError(f"max_batch_size: expected 0 or more, got {self.max_batch_size}")
        if self.max_queue_delay_ms < 0:
            raise ConfigError(
                f"max_queue_delay_ms: expected 0 or more, got {self.max_queue_delay_ms}"
            )
        for name in ("max_queue_size", "model_instances"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected at least 1, got {getattr(self, name)}")
        if self.instance_kind not in KINDS:
            raise ConfigError(
                f"instance_kind: expected one of {', '.join(KINDS)}, got {self.instance_kind!r}"
            )


def _tensor(value: onnx.ValueInfoProto, batched: bool) -> tuple[int, list[int], bool]:
    """(Triton data type, dims without the batch axis, whether it is only the batch axis)."""
    kind = value.type.tensor_type
    if value.type.WhichOneof("value") != "tensor_type" or kind.elem_type not in DATA_TYPES:
        raise TritonError(f"graph tensor {value.name}: not a tensor of a type Triton carries")
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in kind.shape.dim]
    if batched:
        shape = shape[1:]
    return DATA_TYPES[kind.elem_type], shape, batched and not shape


def graph_is_batched(graph: onnx.GraphProto) -> bool:
    """Whether every graph input and output has a dynamic first (batch) axis."""
    feeds = [v for v in graph.input if v.name not in {i.name for i in graph.initializer}]
    return all(
        v.type.tensor_type.shape.dim and not v.type.tensor_type.shape.dim[0].HasField("dim_value")
        for v in [*feeds, *graph.output]
    )


def triton_config(
    graph: onnx.GraphProto, name: str, config: TritonConfig, labels: bool = False
) -> mc.ModelConfig:
    """Triton's ModelConfig for `graph` (inputs and outputs as the graph declares them)."""
    batched = config.max_batch_size > 0 and graph_is_batched(graph)
    model = mc.ModelConfig(
        name=name,
        backend="onnxruntime",
        platform="onnxruntime_onnx",
        max_batch_size=config.max_batch_size if batched else 0,
        default_model_filename=MODEL_FILE,
        instance_group=[
            mc.ModelInstanceGroup(count=config.model_instances, kind=KINDS[config.instance_kind])
        ],
    )
    initializers = {i.name for i in graph.initializer}
    for value in graph.input:
        if value.name in initializers:
            continue
        data_type, dims, scalar = _tensor(value, batched)
        tensor = model.input.add(name=value.name, data_type=data_type, dims=[1] if scalar else dims)
        if scalar:
            tensor.reshape.SetInParent()  # shape [] per row
    for value in graph.output:
        data_type, dims, scalar = _tensor(value, batched)
        out = model.output.add(name=value.name, data_type=data_type, dims=[1] if scalar else dims)
        if scalar:
            out.reshape.SetInParent()
        if labels and value.name == CLASSIFIER_OUTPUT:
            out.label_filename = LABELS_FILE
    if batched:
        model.dynamic_batching.max_queue_delay_microseconds = round(
            config.max_queue_delay_ms * 1000
        )
        model.dynamic_batching.default_queue_policy.max_queue_size = config.max_queue_size
    return model


def write_triton_model(config: TritonConfig) -> Path:
    """Write `<output>/<name>/` (config, version folder, labels for heads); returns it.

    Written into a temporary folder beside it and renamed into place, so that a Triton
    polling the repository never sees half a model; an existing `<output>/<name>` is refused.
    """
    assert config.model is not None  # TritonConfig refuses None
    found = find_model_version(config.model)
    onnx_bytes, card = found.verified_bytes(), found.usable_card
    name = config.name or card.name
    if not name or "/" in name or name.startswith("."):
        raise TritonError(f"name: expected a folder name, got {name!r}")
    target = config.output / name
    if target.exists():
        raise TritonError(f"output: {target} exists already; remove it or choose another --name")
    try:
        graph = onnx.load_model_from_string(onnx_bytes).graph
    except Exception as exc:  # onnx raises DecodeError and others on a damaged file
        raise TritonError(f"{found.model_path}: not an ONNX model: {exc}") from exc
    classes = card.classifier.labels if card.classifier else ()
    model = triton_config(graph, name, config, labels=bool(classes))
    config.output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=config.output))
    try:
        (staging / CONFIG_FILE).write_text(text_format.MessageToString(model))
        copied = staging / str(found.version)
        copied.mkdir()
        (copied / MODEL_FILE).write_bytes(onnx_bytes)
        shutil.copy2(found.card_path, copied / CARD_FILE)
        if classes:
            (staging / LABELS_FILE).write_text("".join(f"{label}\n" for label in classes))
        staging.chmod(0o755)  # mkdtemp makes it private; Triton may run as another user
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `aet triton`: one per `TritonConfig` field, plus `--config`."""
    add_config_arguments(parser, TritonConfig)


def run(args: argparse.Namespace) -> int:
    """`aet triton`: write the model and print where."""
    target = write_triton_model(config_from_args(TritonConfig, args))
    print(f"wrote {target} ({CONFIG_FILE}, {', '.join(sorted(_versions(target)))})")
    return 0


def _versions(target: Path) -> list[str]:
    return [p.name + "/" + MODEL_FILE for p in target.iterdir() if p.name.isdigit()]
