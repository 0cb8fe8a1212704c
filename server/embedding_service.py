"""`aet.v1.EmbeddingService`: embeddings from the models of a `ModelRegistry`.

The hot path per request: look the model up, decode and check the tensor against the version's
prepared `RequestSpec`, submit to its batcher (`_submit`); wait, post-process (L2 / float16),
encode (`_respond`). No logging, and no card parsing, on that path; every error becomes its
gRPC status via `server.errors`. A stream submits its next requests while earlier ones run.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import NamedTuple

import grpc
import numpy as np

from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto.codec import WIRE_DTYPES, decode_tensor, fill_tensor
from aet.server.batcher import BatchFuture
from aet.server.errors import abort, grpc_status
from aet.server.metrics import UNKNOWN_MODEL, RequestTiming, ServingMetrics
from aet.server.models import LoadedModel, ModelRegistry, ModelState, VersionStatus
from aet.server.validation import FLOAT32, validate_inputs

_TINY = np.finfo(np.float32).tiny


STREAM_READ_AHEAD = 4  # requests of one stream decoded and queued ahead of its responses
API_LABEL = "embed"  # the `api` of this service's requests in the metrics


class _Submitted(NamedTuple):
    """A request handed to its model's batcher."""

    request: embedding_pb2.EmbedRequest
    model: LoadedModel
    future: BatchFuture
    decode_seconds: float


_END_OF_STREAM = object()


class EmbeddingService(embedding_pb2_grpc.EmbeddingServiceServicer):
    """The servicer (`build_server` registers it) over the models of `registry`."""

    def __init__(self, registry: ModelRegistry, metrics: ServingMetrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics

    def Embed(
        self, request: embedding_pb2.EmbedRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.EmbedResponse:
        started = time.perf_counter()
        submitted = None
        try:
            submitted = self._submit(request, context, started)
            response = self._respond(submitted)
        except Exception as exc:
            code, message = grpc_status(exc)
            self._observe(request, submitted, code, started)
            context.abort(code, message)
        self._observe(request, submitted, grpc.StatusCode.OK, started, response.timing)
        return response

    def EmbedStream(
        self, request_iterator: Iterator[embedding_pb2.EmbedRequest], context: grpc.ServicerContext
    ) -> Iterator[embedding_pb2.EmbedResponse]:
        """Answers in request order. A reader thread decodes and submits up to
        `STREAM_READ_AHEAD` requests ahead, so the model does not sit idle while the next
        request of the stream is received and decoded."""
        ahead: queue.Queue = queue.Queue(STREAM_READ_AHEAD)
        threading.Thread(
            target=self._read_ahead,
            args=(request_iterator, context, ahead),
            name="embed-stream-reader",
            daemon=True,
        ).start()
        while (item := ahead.get()) is not _END_OF_STREAM:
            request, started, submitted, error = item
            try:
                if error is not None:
                    raise error
                response = self._respond(submitted)
            except Exception as exc:
                code, message = grpc_status(exc)
                self._observe(request, submitted, code, started)
                context.abort(code, f"request_id {request.request_id!r}: {message}")
            self._observe(request, submitted, grpc.StatusCode.OK, started, response.timing)
            yield response

    def _read_ahead(
        self,
        request_iterator: Iterator[embedding_pb2.EmbedRequest],
        context: grpc.ServicerContext,
        ahead: queue.Queue,
    ) -> None:
        """Submit the stream's requests in order, passing on (request, started, submitted, error);
        a request that fails to submit is passed on with its error and ends the reading."""
        try:
            for request in request_iterator:
                started = time.perf_counter()
                try:
                    item = (request, started, self._submit(request, context, started), None)
                except Exception as exc:
                    item = (request, started, None, exc)
                if not _put_while_active(ahead, item, context) or item[3] is not None:
                    return
        except grpc.RpcError:
            return  # the client cancelled or the call ended: nobody to answer
        finally:
            _put_while_active(ahead, _END_OF_STREAM, context)

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

    def DescribeModel(
        self, request: embedding_pb2.DescribeModelRequest, context: grpc.ServicerContext
    ) -> embedding_pb2.ModelDescription:
        try:
            model = self.registry.lookup(request.model, request.version or None)
        except Exception as exc:
            abort(context, exc)
        return describe(model, self.registry.statuses(model.name))

    def _submit(
        self, request: embedding_pb2.EmbedRequest, context: grpc.ServicerContext, started: float
    ) -> _Submitted:
        """Find the model, decode and check the inputs, queue them: nothing waits here."""
        model = self.registry.lookup(request.model, request.version or None)
        inputs = validate_inputs(decode_tensor(request.inputs, "inputs"), model.request_spec)
        decoded = time.perf_counter()
        remaining = context.time_remaining()
        future = model.batcher.submit(
            inputs,
            None if remaining is None else time.monotonic() + remaining,
            lambda: not context.is_active(),
        )
        return _Submitted(request, model, future, decoded - started)

    @staticmethod
    def _respond(submitted: _Submitted) -> embedding_pb2.EmbedResponse:
        """Wait for the embeddings, apply the request's options, encode the response."""
        request, model, future, decode_seconds = submitted
        embeddings = future.result()
        answered = time.perf_counter()
        # Sub-messages are filled in place: building them apart would copy them in.
        response = embedding_pb2.EmbedResponse(
            request_id=request.request_id, model=model.name, version=model.version
        )
        fill_tensor(response.embeddings, _postprocess(embeddings, request.options))
        timing = response.timing
        timing.decode_us = decode_seconds * 1e6
        timing.queue_us = future.queue_seconds * 1e6
        timing.run_us = future.run_seconds * 1e6
        timing.encode_us = (time.perf_counter() - answered) * 1e6
        return response

    def _observe(
        self,
        request: embedding_pb2.EmbedRequest,
        submitted: _Submitted | None,
        code: grpc.StatusCode,
        started: float,
        timing: embedding_pb2.ServerTiming | None = None,
    ) -> None:
        """Report one answered request to the metrics, if the server keeps any."""
        if self.metrics is None:
            return
        if submitted is not None:
            name, version = submitted.model.name, submitted.model.version
        else:  # unresolved: label a known model only, never an arbitrary name (cardinality)
            known = request.model in self.registry.names()
            name, version = (request.model if known else UNKNOWN_MODEL), ""
        self.metrics.observe_request(
            name,
            version,
            API_LABEL,
            code,
            time.perf_counter() - started,
            None
            if timing is None
            else RequestTiming(
                decode=timing.decode_us / 1e6,
                queue=timing.queue_us / 1e6,
                run=timing.run_us / 1e6,
                encode=timing.encode_us / 1e6,
            ),
        )


def _put_while_active(ahead: queue.Queue, item: object, context: grpc.ServicerContext) -> bool:
    """Put `item` once there is room; False if the call ended first (nobody reads any more)."""
    while True:
        try:
            ahead.put(item, timeout=0.1)
            return True
        except queue.Full:
            if not context.is_active():
                return False


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
    )
