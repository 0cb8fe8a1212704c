"""The data plane: one inference pipeline under every protocol the server speaks.

`InferencePipeline.start` resolves the model version, has the protocol decode its request
into a checked array (`decode(model)`), and queues it on the version's dynamic batcher;
`finish` waits for the outputs, has the protocol encode them (`encode(model, outputs)`),
and records the outcome and where the time went in the metrics. Both steps are the same for
`aet.v1.EmbeddingService` and the KServe v2 API: a servicer only decodes and encodes its
messages. `start` never raises (a failure is kept in `Inference.error` and raised by
`finish`), so a stream can keep its requests in order whatever happens to each.

Hot reload: when the latest version is unloaded between lookup and submit and a newer one
serves, a request that asked for "latest" follows it; a pinned version cannot move.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

from aet.conformal import P_VALUE_NAME, p_values
from aet.repository import SCORE_NAME
from aet.runtime import Outputs
from aet.server.batcher import BatchFuture, DynamicBatcher
from aet.server.errors import InvalidArgument, Unavailable, status_code
from aet.server.metrics import UNKNOWN_MODEL, RequestTiming, ServingMetrics
from aet.server.models import LoadedModel, ModelRegistry
from aet.server.telemetry import CallInfo, RequestRecord, RequestTelemetry, request_id
from aet.server.validation import parse_version

Encoded = TypeVar("Encoded")


@dataclass
class Inference:
    """One request on its way through the pipeline."""

    api: str  # the `api` metrics label: "embed", "kserve"
    model_name: str  # as the request named it
    started: float  # perf_counter() on arrival
    model: LoadedModel | None = None  # the version serving it, once resolved
    future: BatchFuture | None = None  # its outputs, once queued
    decoded: float = 0.0  # perf_counter() once decoded and checked
    error: Exception | None = None  # why it failed before reaching the batcher
    p_value: bool = False  # add the conformal p-value, from the score, once the batch ran
    call: CallInfo | None = None  # method, request id, peer, trace context
    rows: int = 0  # rows of its inputs, once decoded
    answered: float | None = None  # perf_counter() once its outputs were there


class InferencePipeline:
    """Lookup, decode and check, batch, run, encode and metrics for the models of `registry`."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: ServingMetrics | None = None,
        telemetry: RequestTelemetry | None = None,
    ) -> None:
        self.registry = registry
        if metrics is None:
            metrics = ServingMetrics(registry.batching.max_batch_size)
            metrics.watch_registry(registry)
        self.metrics = metrics
        self.telemetry = telemetry or RequestTelemetry()
        self.draining = threading.Event()  # set when the server stops: readiness fails first

    def server_ready(self) -> bool:
        """Ready for new traffic: not draining toward a stop, and every model of the
        registry has a READY version (what KServe's ServerReady and HTTP's ready report)."""
        names = self.registry.names()
        return (
            not self.draining.is_set()
            and bool(names)
            and all(self.registry.is_ready(name) for name in names)
        )

    def lookup(self, name: str, version: int | str, version_field: str = "version") -> LoadedModel:
        """The READY version `version` of `name` (0 or "": the latest), for metadata calls."""
        return self.registry.lookup(name, parse_version(version, version_field))

    def start(
        self,
        api: str,
        model_name: str,
        version: int | str,
        decode: Callable[[LoadedModel], np.ndarray],
        time_limits: tuple[float | None, ...] = (),
        is_cancelled: Callable[[], bool] | None = None,
        version_field: str = "version",
        extra_outputs: dict[str, str] | None = None,
        call: CallInfo | None = None,
    ) -> Inference:
        """Resolve `model_name` and `version` (`parse_version`: 0 or "" for the latest),
        decode, check and queue the inputs. Nothing waits here.

        `time_limits` are seconds from now (e.g. the call's deadline; None for none): the
        request is dropped if its batch has not started within the shortest.
        `extra_outputs` maps each output wanted beside the embedding (the novelty score, the
        p-value) to the request field that asked for it; such requests queue on the version's
        batcher for those outputs. `p_value` is computed after the batch from the score and
        the version's calibration scores (INVALID_ARGUMENT naming the field without them).
        `call` says who asked (for the access log and traces; default: `api`, a new id).
        """
        inference = Inference(api, model_name, time.perf_counter(), call=call)
        try:
            number = parse_version(version, version_field)
            limits = [limit for limit in time_limits if limit is not None]
            deadline = time.monotonic() + min(limits) if limits else None
            while inference.future is None:
                model = inference.model = self.registry.lookup(model_name, number)
                wanted = dict(extra_outputs or {})
                if P_VALUE_NAME in wanted:  # a post-step from the score: run the score
                    field = wanted.pop(P_VALUE_NAME)
                    if model.calibration is None:
                        raise InvalidArgument(
                            f"{field}: model {model.name!r} version {model.version} has no "
                            f"{P_VALUE_NAME} output (exported without calibration scores; "
                            f"export it again)"
                        )
                    wanted.setdefault(SCORE_NAME, field)
                    inference.p_value = True
                batcher = _batcher(model, wanted)
                inputs = decode(model)
                inference.decoded, inference.rows = time.perf_counter(), len(inputs)
                try:
                    inference.future = batcher.submit(inputs, deadline, is_cancelled)
                except Unavailable:
                    # Hot reload: the version closed between lookup and submit; follow a newer
                    # "latest" if one serves now.
                    if number is not None or self.registry.lookup(model_name) is model:
                        raise
        except Exception as exc:
            inference.error = exc
        return inference

    def failed(
        self, api: str, model_name: str, error: Exception, call: CallInfo | None = None
    ) -> Inference:
        """A request refused before lookup (e.g. a malformed parameter); `finish` raises
        `error` and records it like any other failure."""
        return Inference(api, model_name, time.perf_counter(), error=error, call=call)

    def finish(
        self, inference: Inference, encode: Callable[[LoadedModel, Outputs], Encoded]
    ) -> tuple[Encoded, RequestTiming]:
        """Wait for the outputs, `encode` them, record the outcome; the encoded response and
        where its time went. Raises the request's error after recording it."""
        model, future = inference.model, inference.future
        try:
            if inference.error is not None:
                raise inference.error
            assert model is not None and future is not None  # `start` sets both, or `error`
            outputs = future.result()
            if inference.p_value:
                assert model.calibration is not None  # `start` checked it
                outputs = {
                    **outputs,
                    P_VALUE_NAME: p_values(model.calibration, outputs[SCORE_NAME]),
                }
            answered = inference.answered = time.perf_counter()
            encoded = encode(model, outputs)
        except Exception as exc:
            self._observe(inference, status_code(exc))
            raise
        done = time.perf_counter()
        timing = RequestTiming(
            decode=inference.decoded - inference.started,
            queue=future.queue_seconds,
            run=future.run_seconds,
            encode=done - answered,
        )
        self._observe(inference, grpc.StatusCode.OK, timing, done)
        return encoded, timing

    def _observe(
        self,
        inference: Inference,
        code: grpc.StatusCode,
        timing: RequestTiming | None = None,
        done: float | None = None,
    ) -> None:
        name: str
        version: int | str
        if inference.model is not None:
            name, version = inference.model.name, inference.model.version
        else:  # unresolved: label a known model only, never an arbitrary name (cardinality)
            known = inference.model_name in self.registry.names()
            name, version = (inference.model_name if known else UNKNOWN_MODEL), ""
        done = done or time.perf_counter()
        self.metrics.observe_request(
            name, version, inference.api, code, done - inference.started, timing
        )
        future = inference.future if timing is not None else None
        self.telemetry.record(
            RequestRecord(
                inference.call or CallInfo(inference.api, request_id()),
                name,
                version,
                inference.rows,
                code,
                inference.started,
                inference.decoded if future is not None else None,
                timing.queue if timing is not None else 0.0,
                timing.run if timing is not None else 0.0,
                future.batch_rows if future is not None else 0,
                inference.answered,
                done,
            )
        )


def _batcher(model: LoadedModel, extra_outputs: dict[str, str]) -> DynamicBatcher:
    """The batcher computing the embedding and `extra_outputs` (name -> the asking field)."""
    batcher = model.batcher_for.get((model.card.output.name, *extra_outputs))
    if batcher is None:
        known = {name for names in model.batcher_for for name in names}
        name, field = next((n, f) for n, f in extra_outputs.items() if n not in known)
        raise InvalidArgument(
            f"{field}: model {model.name!r} version {model.version} has no {name} output "
            f"(exported before aet had it; export it again)"
        )
    return batcher
