"""`aet.v1.EmbeddingService`: embeddings from the models of a `ModelRegistry`.

The servicer only decodes `EmbedRequest`s and encodes `EmbedResponse`s; lookup, checks,
batching, metrics and timing are the shared `InferencePipeline`'s. No logging and no card
parsing on the hot path; every error becomes its gRPC status at the edge (`@maps_errors`).
A stream submits its next requests while earlier ones run (`answer_in_order`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import grpc
import numpy as np

from aet.conformal import P_VALUE_NAME
from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto.codec import WIRE_DTYPES, decode_tensor, fill_tensor
from aet.repository import SCORE_NAME
from aet.server import classification
from aet.server.errors import excerpt, maps_errors, with_prefix
from aet.server.metrics import RequestTiming
from aet.server.models import LoadedModel, ModelState, VersionStatus
from aet.server.pipeline import Inference, InferencePipeline, Outputs
from aet.server.streams import StreamWindow, answer_in_order
from aet.server.telemetry import CallInfo, grpc_call, grpc_stream_id
from aet.server.validation import FLOAT32, check_shape, validate_inputs

_TINY = np.finfo(np.float32).tiny

API_LABEL = "embed"  # the `api` of this service's requests in the metrics
SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name


class EmbeddingService(embedding_pb2_grpc.EmbeddingServiceServicer):
    """The servicer (`build_server` registers it) over the models of `pipeline`."""

    def __init__(self, pipeline: InferencePipeline, window: StreamWindow) -> None:
        self.pipeline = pipeline
        self.registry = pipeline.registry
        self.window = window

    @maps_errors
    def Embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.EmbedResponse:
        call = grpc_call(context, f"/{SERVICE}/Embed", request.request_id)
        return self._finish((request, self._start(request, context, call)))

    @maps_errors
    def EmbedStream(
        self, request_iterator: Iterator[embedding_pb2.EmbedRequest], context: grpc.ServicerContext
    ) -> Iterator[embedding_pb2.EmbedResponse]:
        """Answers in request order; a failed request ends the stream with its status, the
        message naming its request_id."""

        def finish(started: tuple[embedding_pb2.EmbedRequest, Inference]):
            try:
                return self._finish(started)
            except Exception as exc:
                raise with_prefix(exc, f"request_id {excerpt(started[0].request_id)}") from exc

        stream = grpc_stream_id(context)
        yield from answer_in_order(
            request_iterator,
            context,
            lambda request: (
                request,
                self._start(
                    request,
                    context,
                    grpc_call(context, f"/{SERVICE}/EmbedStream", request.request_id, stream),
                ),
            ),
            finish,
            self.window,
        )

    @maps_errors
    def Classify(
        self, request: embedding_pb2.ClassifyRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.ClassifyResponse:
        """Probabilities and the top-k classes from a classifier model: the model and `top_k`
        are checked before the inputs are queued, the top-k found on the batch's output."""

        def check(model: LoadedModel) -> None:
            classification.class_labels(model.card)
            classification.check_top_k(top_k, model.card.output.embedding_dim, "top_k")

        def encode(model: LoadedModel, outputs: Outputs) -> embedding_pb2.ClassifyResponse:
            probabilities = outputs[model.card.output.name]
            names = classification.class_labels(model.card)
            top = classification.classify(probabilities, top_k, names)
            response = embedding_pb2.ClassifyResponse(
                request_id=request.request_id, model=model.name, version=model.version
            )
            fill_tensor(response.probabilities, probabilities)
            for indices, labels, scores in zip(
                top.indices.tolist(), top.labels.tolist(), top.scores.tolist(), strict=True
            ):
                response.top.add(indices=indices, labels=labels, scores=scores)
            return response

        top_k = request.top_k or 1
        call = grpc_call(context, f"/{SERVICE}/Classify", request.request_id)
        response, timing = self.pipeline.finish(self._start(request, context, call, check), encode)
        _fill_timing(response.timing, timing)
        return response

    @maps_errors
    def ListModels(
        self, request: embedding_pb2.ListModelsRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.ListModelsResponse:
        summaries = []
        for name in self.registry.names():
            statuses = self.registry.statuses(name)
            ready = [s.version for s in statuses if s.state is ModelState.READY]
            summaries.append(
                embedding_pb2.ModelSummary(
                    name=name,
                    latest_version=max(ready, default=0),
                    versions=[_version_state(s) for s in statuses],
                )
            )
        return embedding_pb2.ListModelsResponse(models=summaries)

    @maps_errors
    def DescribeModel(
        self, request: embedding_pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.ModelDescription:
        model = self.pipeline.lookup(request.model, request.version)
        return describe(model, self.registry.statuses(model.name))

    def _start(
        self,
        request: embedding_pb2.EmbedRequest | embedding_pb2.ClassifyRequest,
        context: grpc.ServicerContext,
        call: CallInfo,
        check: Callable[[LoadedModel], None] | None = None,
    ) -> Inference:
        """Queue the request's inputs; `check(model)` may refuse the resolved model first.
        Only an `EmbedRequest` may ask for the novelty score (a classifier has none)."""
        extra: dict[str, str] = {}
        if isinstance(request, embedding_pb2.EmbedRequest):
            if request.options.reconstruction_error:
                extra[SCORE_NAME] = "options.reconstruction_error"
            if request.options.p_value:
                extra[P_VALUE_NAME] = "options.p_value"

        def decode(model: LoadedModel) -> np.ndarray:
            if check is not None:
                check(model)
            check_shape(request.inputs.shape, model.request_spec)
            return validate_inputs(decode_tensor(request.inputs, "inputs"), model.request_spec)

        return self.pipeline.start(
            API_LABEL,
            request.model,
            request.version,
            decode,
            (context.time_remaining(),),
            lambda: not context.is_active(),
            extra_outputs=extra or None,
            call=call,
        )

    def _finish(
        self, started: tuple[embedding_pb2.EmbedRequest, Inference]
    ) -> embedding_pb2.EmbedResponse:
        request, inference = started

        def encode(model: LoadedModel, outputs: Outputs) -> embedding_pb2.EmbedResponse:
            # Sub-messages are filled in place: building them apart would copy them in.
            response = embedding_pb2.EmbedResponse(
                request_id=request.request_id, model=model.name, version=model.version
            )
            embeddings = outputs[model.card.output.name]
            fill_tensor(response.embeddings, _postprocess(embeddings, request.options))
            if request.options.reconstruction_error:
                fill_tensor(response.reconstruction_error, outputs[SCORE_NAME])
            if request.options.p_value:
                fill_tensor(response.p_value, outputs[P_VALUE_NAME])
            return response

        response, timing = self.pipeline.finish(inference, encode)
        _fill_timing(response.timing, timing)
        return response


def _fill_timing(fields: embedding_pb2.ServerTiming, timing: RequestTiming) -> None:
    """Where the request's time went, in microseconds."""
    fields.decode_us = timing.decode * 1e6
    fields.queue_us = timing.queue * 1e6
    fields.run_us = timing.run * 1e6
    fields.encode_us = timing.encode * 1e6


def _postprocess(embeddings: np.ndarray, options: embedding_pb2.EmbedOptions) -> np.ndarray:
    """Apply the request's options; never writes into `embeddings` (it may share a batch)."""
    if options.l2_normalize:
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        embeddings = embeddings / np.maximum(norms, _TINY)  # zero rows stay zero
    if options.float16_output:
        embeddings = embeddings.astype(np.float16)
    return embeddings


def _version_state(status: VersionStatus) -> embedding_pb2.ModelVersionState:
    return embedding_pb2.ModelVersionState(
        version=status.version,
        reason=status.reason,
        state=embedding_pb2.ModelVersionState.State.Value(status.state.value),
    )


def describe(model: LoadedModel, statuses: list[VersionStatus]) -> embedding_pb2.ModelDescription:
    """The `ModelDescription` of one loaded version."""
    card, spec, batcher = model.card, model.request_spec, model.batcher
    low, high = card.input.value_range or (-np.inf, np.inf)  # vectors: any finite value
    return embedding_pb2.ModelDescription(
        name=model.name,
        version=model.version,
        versions=[_version_state(s) for s in statuses],
        input=embedding_pb2.TensorSpec(
            name=card.input.name,
            shape=card.input.shape,
            dtype=WIRE_DTYPES[FLOAT32],
            accepted_dtypes=[WIRE_DTYPES[d] for d in spec.accepted_dtypes],
            min_value=low,
            max_value=high,
        ),
        output=embedding_pb2.TensorSpec(
            name=card.output.name, shape=[card.output.embedding_dim], dtype=WIRE_DTYPES[FLOAT32]
        ),
        embedding_dim=card.output.embedding_dim,
        execution_provider=model.session.provider,
        batching=embedding_pb2.BatchingLimits(
            max_batch_size=batcher.max_batch_size,
            max_queue_delay_ms=batcher.max_queue_delay * 1e3,
            max_queue_size=batcher.max_queue_size,
            max_request_rows=spec.max_rows,
            dynamic_batching=batcher.merge_requests,
        ),
        sha256=card.sha256,
        model_card_json=json.dumps(card.to_dict()),
        score=(
            None
            if card.score is None
            else embedding_pb2.TensorSpec(name=card.score.name, dtype=WIRE_DTYPES[FLOAT32])
        ),
        class_labels=card.classifier.labels if card.classifier else (),
    )
