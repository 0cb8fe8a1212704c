"""What each request leaves behind: its id, one access-log line and, when configured, spans.

Every request has an id: the caller's `x-request-id` (gRPC metadata or HTTP header), else the
message's own id (KServe v2 `id`, aet.v1 `request_id`), else a generated one; the servers echo
it back (gRPC: in the trailing metadata). `RequestTelemetry.record` writes one JSON line per
request to the `aet.server.access` logger (method, model, version, rows, status, queue and
compute milliseconds, peer; never tensors or tokens) and, with a tracer, one OpenTelemetry
span per request with a child per stage (receive, queue, compute, reply), joined to the
caller's W3C `traceparent`.

Tracing is configured only by the standard `OTEL_*` environment variables (what KServe
injects): `OTEL_TRACES_EXPORTER` (otlp, console or none) or an OTLP endpoint turns it on;
without them no tracer exists and requests pay nothing for it.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from aet.errors import UserError

if TYPE_CHECKING:  # the SDK is imported only when tracing is configured
    from opentelemetry.trace import Tracer

REQUEST_ID_KEY = "x-request-id"
TRACE_KEYS = ("traceparent", "tracestate")  # W3C trace context, as metadata or headers
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")  # printable ASCII
TRACER_NAME = "aet.server"
DEFAULT_SERVICE_NAME = "aet-serve"

access_log = logging.getLogger("aet.server.access")


@dataclass(frozen=True)
class CallInfo:
    """Who asked, and how: the parts of a request that are not its tensors."""

    method: str  # e.g. "/inference.GRPCInferenceService/ModelInfer", "POST /v2/models/m/infer"
    request_id: str
    peer: str = ""
    trace_headers: tuple[tuple[str, str], ...] = ()  # traceparent / tracestate, if sent


def request_id(*candidates: str | None) -> str:
    """The first candidate that is a usable id (1 to 128 printable ASCII characters without
    spaces), else a new random one: a client's id is kept, never one that could break a log."""
    for candidate in candidates:
        if candidate and _REQUEST_ID_PATTERN.fullmatch(candidate):
            return candidate
    return uuid.uuid4().hex


def grpc_call(
    context: grpc.ServicerContext, method: str, message_id: str = "", stream_id: str = ""
) -> CallInfo:
    """The `CallInfo` of a gRPC request whose message carries `message_id` (or "").

    A unary call's id is the caller's `x-request-id`, else `message_id`, else a new one, and
    is sent back in the trailing metadata (initial metadata would commit the call, and a
    client could no longer retry it by its service config). A stream's messages (`stream_id` from
    `grpc_stream_id`) take their own id, else the stream's.
    """
    metadata = dict(context.invocation_metadata() or ())
    if stream_id:
        rid = request_id(message_id, stream_id)
    else:
        rid = request_id(metadata.get(REQUEST_ID_KEY), message_id)
        context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
    return CallInfo(method, rid, context.peer() or "", trace_headers(metadata.items()))


def grpc_stream_id(context: grpc.ServicerContext) -> str:
    """A streaming call's id (the caller's `x-request-id`, else a new one), sent back in its
    trailing metadata."""
    rid = request_id(dict(context.invocation_metadata() or ()).get(REQUEST_ID_KEY))
    context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
    return rid


def trace_headers(headers: Iterable[tuple[str, Any]]) -> tuple[tuple[str, str], ...]:
    """The W3C trace context among `headers` (lower-case names)."""
    return tuple((k, str(v)) for k, v in headers if k in TRACE_KEYS and isinstance(v, str))


def tracer_from_environment() -> Tracer | None:
    """A tracer exporting as the `OTEL_*` variables say, or None when they configure none."""
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = [
        name.strip().lower()
        for name in env.get("OTEL_TRACES_EXPORTER", "").split(",")
        if name.strip() and name.strip().lower() != "none"
    ]
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if not exporters and ("OTEL_TRACES_EXPORTER" in env or not endpoint):
        return None
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    defaults = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(defaults))
    for name in exporters or ["otlp"]:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        else:
            raise UserError(
                f"OTEL_TRACES_EXPORTER: expected otlp, console or none, got {name[:40]!r}"
            )
    return provider.get_tracer(TRACER_NAME)


@dataclass(frozen=True)
class RequestRecord:
    """One finished request, as the pipeline saw it (times are `perf_counter()` seconds)."""

    call: CallInfo
    model: str
    version: int | str
    rows: int
    status: grpc.StatusCode
    started: float
    decoded: float | None = None  # None: it failed before its batch
    queue: float = 0.0
    run: float = 0.0
    batch_rows: int = 0
    answered: float | None = None
    done: float | None = None


class RequestTelemetry:
    """Writes the access log (`enabled`) and the spans (`tracer`) of finished requests."""

    def __init__(self, access_log_enabled: bool = True, tracer: Tracer | None = None) -> None:
        self.access_log_enabled = access_log_enabled
        self.tracer = tracer

    def record(self, request: RequestRecord) -> None:
        """Log and trace one finished request."""
        done = request.done if request.done is not None else time.perf_counter()
        if self.access_log_enabled:
            access_log.info(
                "request",
                extra={
                    "request_id": request.call.request_id,
                    "method": request.call.method,
                    "model": request.model,
                    "version": request.version,
                    "rows": request.rows,
                    "status": request.status.name,
                    "queue_ms": round(request.queue * 1e3, 3),
                    "compute_ms": round(request.run * 1e3, 3),
                    "total_ms": round((done - request.started) * 1e3, 3),
                    "batch_rows": request.batch_rows,
                    "peer": request.call.peer,
                },
            )
        if self.tracer is not None:
            self._trace(request, done)

    def _trace(self, request: RequestRecord, done: float) -> None:
        from opentelemetry import propagate, trace

        to_ns = _epoch_ns_converter()
        parent = propagate.extract(dict(request.call.trace_headers))
        root = self.tracer.start_span(  # type: ignore[union-attr]
            request.call.method,
            context=parent,
            kind=trace.SpanKind.SERVER,
            start_time=to_ns(request.started),
            attributes={
                "aet.request_id": request.call.request_id,
                "aet.model": request.model,
                "aet.model_version": str(request.version),
                "aet.rows": request.rows,
                "aet.batch_rows": request.batch_rows,
                "aet.status": request.status.name,
                "net.peer.name": request.call.peer,
            },
        )
        if request.status != grpc.StatusCode.OK:
            root.set_status(trace.Status(trace.StatusCode.ERROR, request.status.name))
        inside = trace.set_span_in_context(root)
        stages = [("receive", request.started, request.decoded or done)]
        if request.decoded is not None and request.answered is not None:
            queued_until = request.decoded + request.queue
            stages += [
                ("queue", request.decoded, queued_until),
                ("compute", queued_until, queued_until + request.run),
                ("reply", request.answered, done),
            ]
        for name, start, end in stages:
            span = self.tracer.start_span(  # type: ignore[union-attr]
                name, context=inside, start_time=to_ns(start)
            )
            if name == "compute":
                span.set_attribute("aet.batch_rows", request.batch_rows)
            span.end(end_time=to_ns(end))
        root.end(end_time=to_ns(done))


def _epoch_ns_converter():
    """`perf_counter()` seconds to epoch nanoseconds (what span timestamps are)."""
    now_ns, now = time.time_ns(), time.perf_counter()
    return lambda seconds: now_ns - round((now - seconds) * 1e9)
