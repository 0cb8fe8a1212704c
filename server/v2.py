"""The KServe v2 / Open Inference Protocol apart from its wire: what its gRPC service
(`server.kserve_service`) and its HTTP/REST front end (`server.http`) share.

Each front end reads its own messages into plain values (names, datatypes, shapes, requested
outputs with their class counts) and calls these: the input's header check, the outputs a
request may ask for and those it gets, readiness, metadata, Triton's model configuration and
statistics and the repository extension. Metadata, configuration, statistics and the
repository index are built as the protobuf messages of Triton's schema, which gRPC sends as
they are and HTTP prints as JSON. Messages name the protocol's fields (`inputs[pixels].shape`,
`outputs[0].name`), the same on both wires.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from aet.conformal import P_VALUE_NAME
from aet.proto import grpc_service_pb2 as pb
from aet.proto import model_config_pb2
from aet.repository import MODEL_FILE, SCORE_NAME
from aet.server import classification
from aet.server.errors import InvalidArgument, Unavailable, excerpt
from aet.server.metrics import Duration, ServingMetrics, StatisticsSnapshot
from aet.server.models import LoadedModel, ModelRegistry, ModelState
from aet.server.pipeline import InferencePipeline, Outputs
from aet.server.validation import check_shape, parse_version

SERVER_NAME = "ae-transfer"
PLATFORM = "onnxruntime_onnx"
# Only what is really implemented: "statistics" makes perf_analyzer read ModelStatistics;
# "classification" is Triton's top-k output for classifier models (`server.classification`).
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
CLASSIFICATION_PARAMETER = "classification"  # Triton's output parameter: the class count

# v2 datatype names <-> numpy, for the types a request may name (checked against the model).
V2_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
V2_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in V2_DTYPES.items()}


def server_version() -> str:
    """The installed ae-transfer version, as server metadata reports it."""
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


# -- requests ---------------------------------------------------------------------------------


def check_input(
    count: int, name: str, datatype: str, shape: Sequence[int], model: LoadedModel
) -> tuple[str, np.dtype]:
    """Check a request's input tensors before any data is read: one tensor, the model's input
    name, an accepted datatype and shape. Its field in messages (`inputs[<name>]`) and dtype."""
    expected_name = model.card.input.name
    if count != 1:
        raise InvalidArgument(f"inputs: expected 1 tensor ({expected_name!r}), got {count}")
    if name != expected_name:
        raise InvalidArgument(f"inputs[0].name: expected {expected_name!r}, got {excerpt(name)}")
    field = f"inputs[{name}]"
    accepted = [V2_NAMES[dtype] for dtype in model.request_spec.accepted_dtypes]
    if datatype not in accepted:
        raise InvalidArgument(
            f"{field}.datatype: expected {' or '.join(accepted)}, got {excerpt(datatype)}"
        )
    check_shape(shape, model.request_spec, field)
    return field, V2_DTYPES[datatype]


def check_parameters(names: Iterable[str]) -> None:
    """Refuse the sequence parameters (no stateful models here); others pass, as Triton passes
    them to backends."""
    for key in SEQUENCE_PARAMETERS:
        if key in names:
            raise InvalidArgument(
                f"parameters[{key!r}]: expected absent (models here are not "
                "stateful: no sequence batching), got it set"
            )


def timeout_seconds(microseconds: int) -> float:
    """The `timeout` request parameter (microseconds, >= 0) in seconds."""
    if microseconds < 0:
        raise InvalidArgument(
            f"parameters['timeout']: expected microseconds >= 0, got {microseconds}"
        )
    return microseconds / 1e6


@dataclass(frozen=True)
class RequestedOutput:
    """One entry of a request's `outputs`: its name and `classification` class count (None
    when the request did not ask for classes)."""

    name: str
    class_count: int | None = None


@dataclass(frozen=True)
class OutputTensor:
    """One output of a response: FP32 little-endian rows, or BYTES as an object array of str."""

    name: str
    datatype: str  # "FP32" or "BYTES"
    array: np.ndarray

    def raw(self) -> bytes:
        """The tensor's bytes on the wire (BYTES: Triton's 4-byte length before each element)."""
        if self.datatype != "BYTES":
            return self.array.tobytes()
        parts = []
        for element in self.array.flat:
            encoded = element.encode()
            parts += [struct.pack("<I", len(encoded)), encoded]
        return b"".join(parts)


def output_names(model: LoadedModel) -> list[str]:
    """The model's outputs: the embedding, the novelty score when its graph has one, and the
    score's conformal p-value when the version has calibration scores."""
    card = model.card
    score = [] if card.score is None else [card.score.name]
    return [card.output.name] + score + ([] if model.calibration is None else [P_VALUE_NAME])


def extra_outputs(requested: Sequence[RequestedOutput]) -> dict[str, str]:
    """The outputs the request asks for beside the embedding (the novelty score, its p-value),
    each with the `outputs[i].name` field that asked. A request that names no outputs gets the
    embedding alone (the score costs the decoder)."""
    return {
        output.name: f"outputs[{i}].name"
        for i, output in enumerate(requested)
        if output.name in (SCORE_NAME, P_VALUE_NAME)
    }


def check_requested_outputs(requested: Sequence[RequestedOutput], model: LoadedModel) -> None:
    """Every requested output must be one of the model's outputs; a class count (Triton's
    classification extension) only for classifiers, 1 <= class_count <= K."""
    valid = output_names(model)
    for i, output in enumerate(requested):
        if output.name == P_VALUE_NAME and model.calibration is None:
            raise InvalidArgument(
                f"outputs[{i}].name: model {model.name!r} version {model.version} has no "
                f"{P_VALUE_NAME} output (exported without calibration scores; export it again)"
            )
        if output.name not in valid:
            raise InvalidArgument(
                f"outputs[{i}].name: expected {' or '.join(map(repr, valid))}, "
                f"got {excerpt(output.name)}"
            )
        if output.class_count is not None:
            classification.check_class_count(
                output.class_count,
                f"outputs[{i}].parameters['{CLASSIFICATION_PARAMETER}']",
                model.card,
            )


def response_tensors(
    requested: Sequence[RequestedOutput], model: LoadedModel, outputs: Outputs
) -> list[OutputTensor]:
    """Each requested output (all computed when the request named none) in the request's
    order: FP32 rows, or, asked with a class count, Triton's BYTES "score:index:label"."""
    class_counts = {o.name: o.class_count for o in requested if o.class_count is not None}
    tensors = []
    for name in dict.fromkeys([o.name for o in requested] or list(outputs)):
        if name in class_counts:
            labels = classification.class_labels(model.card)
            strings = classification.kserve_classification(
                outputs[name], class_counts[name], labels
            )
            tensors.append(OutputTensor(name, "BYTES", strings))
        else:
            little = np.ascontiguousarray(outputs[name], dtype="<f4")
            tensors.append(OutputTensor(name, "FP32", little))
    return tensors


# -- health, metadata, configuration, statistics ----------------------------------------------


def model_ready(pipeline: InferencePipeline, name: str, version: str) -> bool:
    """Whether the version (latest for "") serves; `NotFound` for an unknown one."""
    try:
        pipeline.lookup(name, version)
    except Unavailable:  # a known version that is loading, draining or failed
        return False
    return True


def server_metadata(extensions: Sequence[str] = EXTENSIONS) -> pb.ServerMetadataResponse:
    """Name, version and the protocol extensions of this server."""
    return pb.ServerMetadataResponse(
        name=SERVER_NAME, version=server_version(), extensions=extensions
    )


def model_metadata(
    pipeline: InferencePipeline, name: str, version: str
) -> pb.ModelMetadataResponse:
    """The version's (latest for "") tensors, every shape led by -1 (the batch)."""
    model = pipeline.lookup(name, version)
    card = model.card
    tensor = pb.ModelMetadataResponse.TensorMetadata
    embedding_shape = [-1, card.output.embedding_dim]
    outputs = [tensor(name=card.output.name, datatype="FP32", shape=embedding_shape)]
    if card.score is not None:
        outputs.append(tensor(name=card.score.name, datatype="FP32", shape=[-1]))
    if model.calibration is not None:
        outputs.append(tensor(name=P_VALUE_NAME, datatype="FP32", shape=[-1]))
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[
            str(s.version)
            for s in pipeline.registry.statuses(model.name)
            if s.state == ModelState.READY
        ],
        platform=PLATFORM,
        inputs=[tensor(name=card.input.name, datatype="FP32", shape=[-1, *card.input.shape])],
        outputs=outputs,
    )


def model_config(model: LoadedModel) -> model_config_pb2.ModelConfig:
    """The version's configuration in Triton's schema (what perf_analyzer needs to drive it)."""
    card, spec, batcher = model.card, model.request_spec, model.batcher
    config = model_config_pb2.ModelConfig(
        name=model.name,
        platform=PLATFORM,
        backend="onnxruntime",
        version_policy=model_config_pb2.ModelVersionPolicy(
            all=model_config_pb2.ModelVersionPolicy.All()
        ),
        max_batch_size=spec.max_rows,
        input=[
            model_config_pb2.ModelInput(
                name=card.input.name, data_type=model_config_pb2.TYPE_FP32, dims=card.input.shape
            )
        ],
        output=[
            model_config_pb2.ModelOutput(
                name=card.output.name,
                data_type=model_config_pb2.TYPE_FP32,
                dims=[card.output.embedding_dim],
            ),
            *(
                # one number per row: no dims beyond the implicit batch axis, as in metadata
                [
                    model_config_pb2.ModelOutput(
                        name=card.score.name, data_type=model_config_pb2.TYPE_FP32, dims=[]
                    )
                ]
                if card.score is not None
                else []
            ),
        ],
        instance_group=[
            model_config_pb2.ModelInstanceGroup(
                count=1,
                kind=(
                    model_config_pb2.ModelInstanceGroup.KIND_GPU
                    if model.session.provider.startswith("CUDA")
                    else model_config_pb2.ModelInstanceGroup.KIND_CPU
                ),
            )
        ],
        default_model_filename=MODEL_FILE,
    )
    if batcher.merge_requests:
        config.dynamic_batching.CopyFrom(
            model_config_pb2.ModelDynamicBatching(
                preferred_batch_size=[batcher.max_batch_size],
                max_queue_delay_microseconds=round(batcher.max_queue_delay * 1e6),
                default_queue_policy=model_config_pb2.ModelQueuePolicy(
                    max_queue_size=batcher.max_queue_size
                ),
            )
        )
    return config


def statistics(
    registry: ModelRegistry, metrics: ServingMetrics, name: str, version: str
) -> pb.ModelStatisticsResponse:
    """Cumulative statistics of READY versions (of one model and version, if named)."""
    number = None
    if name:  # a version without a model name is ignored, as in Triton
        number = parse_version(version)
        registry.lookup(name, number)
    chosen = [
        model for model in registry if name in ("", model.name) and number in (None, model.version)
    ]
    return pb.ModelStatisticsResponse(
        model_stats=[
            statistics_message(metrics.version(model.name, model.version).snapshot())
            for model in chosen
        ]
    )


def statistics_message(snapshot: StatisticsSnapshot) -> pb.ModelStatistics:
    """A `StatisticsSnapshot` as the v2 ModelStatistics message."""

    def duration(d: Duration) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=d.count, ns=d.ns)

    return pb.ModelStatistics(
        name=snapshot.model,
        version=snapshot.version,
        last_inference=snapshot.last_inference_ms,
        inference_count=snapshot.inference_count,
        execution_count=snapshot.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(snapshot.success),
            fail=duration(snapshot.fail),
            queue=duration(snapshot.queue),
            compute_input=duration(snapshot.compute_input),
            compute_infer=duration(snapshot.compute_infer),
            compute_output=duration(snapshot.compute_output),
        ),
        batch_stats=[
            pb.InferBatchStatistics(batch_size=size, compute_infer=duration(d))
            for size, d in sorted(snapshot.batches.items())
        ],
    )
