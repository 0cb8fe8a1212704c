"""`inference.GRPCInferenceService`: the KServe v2 / Open Inference Protocol over the registry.

Speaks Triton's gRPC protocol so that `tritonclient.grpc`, `perf_analyzer` and KServe work
unchanged, on the same `InferencePipeline` (lookup, checks, dynamic batchers, metrics) as our
own `aet.v1.EmbeddingService`: this module only decodes v2 requests and encodes v2 responses.
A model has one input (the card's, e.g. `pixels`, FP32 or UINT8, shape [-1, C, H, W]) and one
output (`embedding`, FP32, [-1, dim]). Inputs arrive as `raw_input_contents` (little-endian
bytes) or as typed `contents`; outputs always leave as `raw_output_contents`, as Triton sends
them. Classifier models (`aet head`) output `probabilities` (FP32, [-1, classes]) and support
Triton's classification extension (`server.classification`).

Request parameters: `timeout` (int64, microseconds) bounds the time a request may wait for its
batch, on top of the gRPC deadline; sequence parameters are refused (no stateful models);
`triton_enable_empty_final_response` (sent by perf_analyzer) is accepted; others are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from importlib import metadata

import grpc
import numpy as np

from aet.conformal import P_VALUE_NAME
from aet.proto import grpc_service_pb2 as pb
from aet.proto import grpc_service_pb2_grpc, model_config_pb2
from aet.proto.codec import decode_raw
from aet.repository import MODEL_FILE, SCORE_NAME
from aet.server import classification
from aet.server.auth import AUTH_METADATA_KEY
from aet.server.control import ModelControl
from aet.server.errors import InvalidArgument, Unavailable, excerpt, grpc_status, maps_errors
from aet.server.metrics import Duration, StatisticsSnapshot
from aet.server.models import LoadedModel, ModelState
from aet.server.pipeline import Inference, InferencePipeline, Outputs
from aet.server.streams import StreamWindow, answer_in_order
from aet.server.telemetry import CallInfo, grpc_call, grpc_stream_id
from aet.server.validation import check_shape, parse_version, validate_inputs

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "ae-transfer"
PLATFORM = "onnxruntime_onnx"
API_LABEL = "kserve"
# Only what is really implemented: "statistics" makes perf_analyzer read ModelStatistics;
# "classification" is Triton's top-k output for classifier models (`server.classification`).
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")

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
# The typed `contents` field each accepted datatype travels in.
CONTENTS_FIELDS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}


def server_version() -> str:
    """The installed ae-transfer version, as ServerMetadata reports it."""
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "unknown"


def decode_input(request: pb.ModelInferRequest, model: LoadedModel) -> np.ndarray:
    """The request's one input as a checked float32 array (rows, *row shape)."""
    expected_name = model.card.input.name
    if len(request.inputs) != 1:
        raise InvalidArgument(
            f"inputs: expected 1 tensor ({expected_name!r}), got {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.name != expected_name:
        raise InvalidArgument(
            f"inputs[0].name: expected {expected_name!r}, got {excerpt(tensor.name)}"
        )
    field = f"inputs[{tensor.name}]"
    accepted = [V2_NAMES[dtype] for dtype in model.request_spec.accepted_dtypes]
    if tensor.datatype not in accepted:
        raise InvalidArgument(
            f"{field}.datatype: expected {' or '.join(accepted)}, got {excerpt(tensor.datatype)}"
        )
    dtype = V2_DTYPES[tensor.datatype]
    check_shape(tensor.shape, model.request_spec, field)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidArgument(
                f"raw_input_contents: expected 1 entry (one per input), "
                f"got {len(request.raw_input_contents)}"
            )
        if tensor.HasField("contents"):
            raise InvalidArgument(
                f"{field}.contents: expected it empty when raw_input_contents is given, got both"
            )
        array = decode_raw(request.raw_input_contents[0], tensor.shape, dtype, field)
    else:
        array = _typed_contents(tensor, dtype, field)
    return validate_inputs(array, model.request_spec, field)


def _typed_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, dtype: np.dtype, field: str
) -> np.ndarray:
    """The tensor's typed `contents` as an array of its declared shape."""
    expected_field = CONTENTS_FIELDS[tensor.datatype]
    present = [f.name for f, _ in tensor.contents.ListFields()]
    if present != [expected_field]:
        raise InvalidArgument(
            f"{field}.contents: expected {expected_field} for {tensor.datatype} (or "
            f"raw_input_contents), got {', '.join(present) or 'no data'}"
        )
    shape = tuple(tensor.shape)  # checked by `check_shape`
    values = getattr(tensor.contents, expected_field)
    if len(values) != math.prod(shape):
        raise InvalidArgument(
            f"{field}.contents.{expected_field}: expected {math.prod(shape)} "
            f"values for shape {list(shape)}, got {len(values)}"
        )
    array = np.asarray(values)
    if dtype == np.uint8 and array.size and int(array.max()) > 255:
        raise InvalidArgument(
            f"{field}.contents.{expected_field}: expected UINT8 values "
            f"0..255, got {int(array.max())}"
        )
    return array.astype(dtype).reshape(shape)


def request_timeout(request: pb.ModelInferRequest) -> float | None:
    """The `timeout` request parameter in seconds (None if absent), after checking the
    parameters this server understands; others pass, as Triton passes them to backends."""
    params = request.parameters
    for key in SEQUENCE_PARAMETERS:
        if key in params:
            raise InvalidArgument(
                f"parameters[{key!r}]: expected absent (models here are not "
                "stateful: no sequence batching), got it set"
            )
    for key, expected in (
        ("triton_enable_empty_final_response", "bool_param"),
        ("timeout", "int64_param"),
    ):
        if key in params and params[key].WhichOneof("parameter_choice") != expected:
            raise InvalidArgument(
                f"parameters[{key!r}]: expected {expected}, got "
                f"{params[key].WhichOneof('parameter_choice') or 'no value'}"
            )
    if "timeout" not in params:
        return None
    if params["timeout"].int64_param < 0:
        raise InvalidArgument(
            f"parameters['timeout']: expected microseconds >= 0, "
            f"got {params['timeout'].int64_param}"
        )
    return params["timeout"].int64_param / 1e6


def output_names(model: LoadedModel) -> list[str]:
    """The model's outputs: the embedding, the novelty score when its graph has one, and the
    score's conformal p-value when the version has calibration scores."""
    card = model.card
    score = [] if card.score is None else [card.score.name]
    return [card.output.name] + score + ([] if model.calibration is None else [P_VALUE_NAME])


def extra_outputs(request: pb.ModelInferRequest) -> dict[str, str]:
    """The outputs the request asks for beside the embedding (the novelty score), each with
    the `outputs[i].name` field that asked. A request that names no outputs gets the
    embedding alone (the score costs the decoder)."""
    return {
        output.name: f"outputs[{i}].name"
        for i, output in enumerate(request.outputs)
        if output.name in (SCORE_NAME, P_VALUE_NAME)
    }


def check_requested_outputs(request: pb.ModelInferRequest, model: LoadedModel) -> None:
    """Every requested output must be one of the model's outputs; the `classification`
    parameter (Triton's classification extension) only for classifiers, 1 <= class_count <= K."""
    valid = output_names(model)
    for i, output in enumerate(request.outputs):
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
        classification.kserve_class_count(output, i, model.card)


def infer_response(
    request: pb.ModelInferRequest, model: LoadedModel, outputs: Outputs
) -> pb.ModelInferResponse:
    """The v2 response carrying each requested output (all it computed when the request named
    none) as raw little-endian FP32 bytes, in the request's order; an output requested with a
    class count leaves as Triton's BYTES "score:index:label" classification."""
    class_counts = {
        output.name: k
        for i, output in enumerate(request.outputs)
        if (k := classification.kserve_class_count(output, i, model.card)) is not None
    }
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=str(model.version), id=request.id
    )
    names = [output.name for output in request.outputs] or list(outputs)
    for name in dict.fromkeys(names):
        if name in class_counts:
            labels = classification.class_labels(model.card)
            shape, raw = classification.kserve_classification(
                outputs[name], class_counts[name], labels
            )
            response.outputs.add(name=name, datatype="BYTES", shape=shape)
            response.raw_output_contents.append(raw)
            continue
        little = np.ascontiguousarray(outputs[name], dtype="<f4")
        response.outputs.add(name=name, datatype="FP32", shape=little.shape)
        response.raw_output_contents.append(little.tobytes())
    return response


class InferenceService(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """The v2 servicer; `build_server(services=[ServiceBinding(SERVICE_NAME, s.add_to_server)])`."""

    def __init__(
        self, pipeline: InferencePipeline, control: ModelControl, window: StreamWindow
    ) -> None:
        self.pipeline = pipeline
        self.registry = pipeline.registry
        self.metrics = pipeline.metrics
        self.control = control
        self.window = window

    def add_to_server(self, server: grpc.Server) -> None:
        """Register this servicer with `server`."""
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self, server)

    # -- health and metadata ----------------------------------------------------------------

    def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        """Ready when every model has a READY version and the server is not draining."""
        return pb.ServerReadyResponse(ready=self.pipeline.server_ready())

    @maps_errors
    def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        try:
            self.pipeline.lookup(request.name, request.version)
        except Unavailable:  # a known version that is loading, draining or failed
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS
        )

    @maps_errors
    def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        model = self.pipeline.lookup(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=model.name,
            versions=self._ready_versions(model.name),
            platform=PLATFORM,
            inputs=[
                tensor(
                    name=model.card.input.name, datatype="FP32", shape=[-1, *model.card.input.shape]
                )
            ],
            outputs=[
                tensor(
                    name=model.card.output.name,
                    datatype="FP32",
                    shape=[-1, model.card.output.embedding_dim],
                ),
                *(
                    [tensor(name=model.card.score.name, datatype="FP32", shape=[-1])]
                    if model.card.score is not None
                    else []
                ),
                *(
                    [tensor(name=P_VALUE_NAME, datatype="FP32", shape=[-1])]
                    if model.calibration is not None
                    else []
                ),
            ],
        )

    @maps_errors
    def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        model = self.pipeline.lookup(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config(model))

    # -- inference --------------------------------------------------------------------------

    @maps_errors
    def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext
    ) -> pb.ModelInferResponse:
        call = grpc_call(context, f"/{SERVICE_NAME}/ModelInfer", request.id)
        return self._finish(self._start(request, context, call))

    @maps_errors
    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Answers in request order; a failed request gets `error_message`, the stream goes on."""

        def finish(started: tuple[pb.ModelInferRequest, Inference]):
            try:
                response, message = self._finish(started), ""
            except Exception as exc:
                request = started[0]
                message = grpc_status(exc)[1]
                response = pb.ModelInferResponse(
                    id=request.id,
                    model_name=request.model_name,
                    model_version=request.model_version,
                )
            return pb.ModelStreamInferResponse(error_message=message, infer_response=response)

        stream = grpc_stream_id(context)
        yield from answer_in_order(
            request_iterator,
            context,
            lambda request: self._start(
                request,
                context,
                grpc_call(context, f"/{SERVICE_NAME}/ModelStreamInfer", request.id, stream),
            ),
            finish,
            self.window,
        )

    def _start(
        self, request: pb.ModelInferRequest, context: grpc.ServicerContext, call: CallInfo
    ) -> tuple[pb.ModelInferRequest, Inference]:
        """Check the request's parameters, then resolve, decode, check and queue it."""

        def decode(model: LoadedModel) -> np.ndarray:
            check_requested_outputs(request, model)
            return decode_input(request, model)

        try:
            timeout = request_timeout(request)
        except InvalidArgument as exc:
            return request, self.pipeline.failed(API_LABEL, request.model_name, exc, call)
        return request, self.pipeline.start(
            API_LABEL,
            request.model_name,
            request.model_version,
            decode,
            (context.time_remaining(), timeout),
            lambda: not context.is_active(),
            version_field="model_version",
            extra_outputs=extra_outputs(request),
            call=call,
        )

    def _finish(self, started: tuple[pb.ModelInferRequest, Inference]) -> pb.ModelInferResponse:
        request, inference = started
        response, _ = self.pipeline.finish(
            inference, lambda model, outputs: infer_response(request, model, outputs)
        )
        return response

    # -- statistics and repository ------------------------------------------------------------

    @maps_errors
    def ModelStatistics(self, request, context) -> pb.ModelStatisticsResponse:
        """Cumulative statistics of READY versions (of one model and version, if named)."""
        version = None
        if request.name:  # a version without a model name is ignored, as in Triton
            version = parse_version(request.version)
            self.registry.lookup(request.name, version)
        chosen = [
            model
            for model in self.registry
            if request.name in ("", model.name) and version in (None, model.version)
        ]
        return pb.ModelStatisticsResponse(
            model_stats=[
                statistics_message(self.metrics.version(model.name, model.version).snapshot())
                for model in chosen
            ]
        )

    @maps_errors
    def RepositoryIndex(self, request, context) -> pb.RepositoryIndexResponse:
        """Every version the registry knows, plus repository models that are not loaded."""
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[entry(**vars(e)) for e in self.control.index(request.ready)]
        )

    @maps_errors
    def RepositoryModelLoad(self, request, context) -> pb.RepositoryModelLoadResponse:
        """Load the model's new versions from the repository (model control, admin token)."""
        self.control.load(request.model_name, request.parameters, _authorization(context))
        return pb.RepositoryModelLoadResponse()

    @maps_errors
    def RepositoryModelUnload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        """Stop serving the model once in-flight requests finish (model control, admin token)."""
        self.control.unload(request.model_name, request.parameters, _authorization(context))
        return pb.RepositoryModelUnloadResponse()

    # -- helpers ----------------------------------------------------------------------------

    def _ready_versions(self, name: str) -> list[str]:
        return [str(s.version) for s in self.registry.statuses(name) if s.state == ModelState.READY]


def _authorization(context: grpc.ServicerContext) -> str | None:
    """The call's `authorization` metadata value, if any."""
    return next(
        (value for key, value in context.invocation_metadata() or () if key == AUTH_METADATA_KEY),
        None,
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
