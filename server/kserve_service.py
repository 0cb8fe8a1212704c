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

import grpc
import numpy as np

from aet.proto import grpc_service_pb2 as pb
from aet.proto import grpc_service_pb2_grpc
from aet.proto.codec import decode_raw
from aet.server import v2
from aet.server.auth import AUTH_METADATA_KEY
from aet.server.control import ModelControl
from aet.server.errors import InvalidArgument, grpc_status, maps_errors
from aet.server.models import LoadedModel
from aet.server.pipeline import Inference, InferencePipeline, Outputs
from aet.server.streams import StreamWindow, answer_in_order
from aet.server.telemetry import CallInfo, grpc_call, grpc_stream_id
from aet.server.validation import validate_inputs

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
API_LABEL = "kserve"
# The typed `contents` field each accepted datatype travels in.
CONTENTS_FIELDS = {"FP32": "fp32_contents", "UINT8": "uint_contents"}
# A request on its way: the message, its requested outputs, its place in the pipeline.
Started = tuple[pb.ModelInferRequest, list[v2.RequestedOutput], Inference]


def decode_input(request: pb.ModelInferRequest, model: LoadedModel) -> np.ndarray:
    """The request's one input as a checked float32 array (rows, *row shape)."""
    tensor = request.inputs[0] if request.inputs else pb.ModelInferRequest.InferInputTensor()
    field, dtype = v2.check_input(
        len(request.inputs), tensor.name, tensor.datatype, tensor.shape, model
    )
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
    v2.check_parameters(params)
    for key, expected in (
        ("triton_enable_empty_final_response", "bool_param"),
        ("timeout", "int64_param"),
    ):
        if key in params and params[key].WhichOneof("parameter_choice") != expected:
            raise InvalidArgument(
                f"parameters[{key!r}]: expected {expected}, got "
                f"{params[key].WhichOneof('parameter_choice') or 'no value'}"
            )
    return None if "timeout" not in params else v2.timeout_seconds(params["timeout"].int64_param)


def requested_outputs(request: pb.ModelInferRequest) -> list[v2.RequestedOutput]:
    """The request's `outputs` with their class counts (the `classification` parameter)."""
    requested = []
    for i, output in enumerate(request.outputs):
        count = None
        if v2.CLASSIFICATION_PARAMETER in output.parameters:
            parameter = output.parameters[v2.CLASSIFICATION_PARAMETER]
            if parameter.WhichOneof("parameter_choice") != "int64_param":
                raise InvalidArgument(
                    f"outputs[{i}].parameters['{v2.CLASSIFICATION_PARAMETER}']: expected "
                    f"int64_param (the class count), "
                    f"got {parameter.WhichOneof('parameter_choice') or 'no value'}"
                )
            count = parameter.int64_param
        requested.append(v2.RequestedOutput(output.name, count))
    return requested


def infer_response(
    request: pb.ModelInferRequest,
    requested: list[v2.RequestedOutput],
    model: LoadedModel,
    outputs: Outputs,
) -> pb.ModelInferResponse:
    """The v2 response carrying `v2.response_tensors` as raw little-endian bytes."""
    response = pb.ModelInferResponse(
        model_name=model.name, model_version=str(model.version), id=request.id
    )
    for tensor in v2.response_tensors(requested, model, outputs):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.array.shape)
        response.raw_output_contents.append(tensor.raw())
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
        return pb.ModelReadyResponse(
            ready=v2.model_ready(self.pipeline, request.name, request.version)
        )

    def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return v2.server_metadata()

    @maps_errors
    def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        return v2.model_metadata(self.pipeline, request.name, request.version)

    @maps_errors
    def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        model = self.pipeline.lookup(request.name, request.version)
        return pb.ModelConfigResponse(config=v2.model_config(model))

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

        def finish(started: Started):
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
    ) -> Started:
        """Check the request's parameters, then resolve, decode, check and queue it."""
        try:
            timeout = request_timeout(request)
            requested = requested_outputs(request)
        except InvalidArgument as exc:
            return request, [], self.pipeline.failed(API_LABEL, request.model_name, exc, call)

        def decode(model: LoadedModel) -> np.ndarray:
            v2.check_requested_outputs(requested, model)
            return decode_input(request, model)

        return (
            request,
            requested,
            self.pipeline.start(
                API_LABEL,
                request.model_name,
                request.model_version,
                decode,
                (context.time_remaining(), timeout),
                lambda: not context.is_active(),
                version_field="model_version",
                extra_outputs=v2.extra_outputs(requested),
                call=call,
            ),
        )

    def _finish(self, started: Started) -> pb.ModelInferResponse:
        request, requested, inference = started
        response, _ = self.pipeline.finish(
            inference, lambda model, outputs: infer_response(request, requested, model, outputs)
        )
        return response

    # -- statistics and repository ------------------------------------------------------------

    @maps_errors
    def ModelStatistics(self, request, context) -> pb.ModelStatisticsResponse:
        """Cumulative statistics of READY versions (of one model and version, if named)."""
        return v2.statistics(self.registry, self.metrics, request.name, request.version)

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


def _authorization(context: grpc.ServicerContext) -> str | None:
    """The call's `authorization` metadata value, if any."""
    return next(
        (value for key, value in context.invocation_metadata() or () if key == AUTH_METADATA_KEY),
        None,
    )
