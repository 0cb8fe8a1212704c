"""Request ids, the access log and OpenTelemetry spans of one request (server/telemetry.py).

A request's id, model, batch size and queue and compute times must be findable in its access
log line and in its spans (an in-memory exporter here), joined to the caller's W3C trace, and
no tensor value or token may appear in either.
"""

from __future__ import annotations

import http.client
import json
import logging

import grpc
import pytest
from kserve_harness import MODEL, add_version, digits_pixels, kserve_request, start_kserve_server
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from aet.errors import UserError
from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto import grpc_service_pb2 as pb
from aet.proto import grpc_service_pb2_grpc as pb_grpc
from aet.proto.codec import encode_tensor
from aet.server.app import JsonLogFormatter
from aet.server.telemetry import REQUEST_ID_KEY, access_log, request_id, tracer_from_environment

SEED = 1
TOKEN = "telemetry-token-0123456789"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN_ID}-01"
WAIT = 30


class Lines(logging.Handler):
    """The access log's lines, formatted as `aet serve` writes them."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonLogFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def lines():
    handler = Lines()
    level = access_log.level
    access_log.addHandler(handler)
    access_log.setLevel(logging.INFO)
    yield handler.lines
    access_log.removeHandler(handler)
    access_log.setLevel(level)


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test"), exporter
    provider.shutdown()


def test_one_request_is_found_by_its_id_in_the_log_and_the_trace(tmp_path, lines, spans):
    tracer, exporter = spans
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, tokens=(TOKEN,), tracer=tracer)
    pixels = digits_pixels(3)
    metadata = [
        ("authorization", f"Bearer {TOKEN}"),
        (REQUEST_ID_KEY, "req-42"),
        ("traceparent", TRACEPARENT),
    ]
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            _, call = stub.ModelInfer.with_call(
                kserve_request(pixels), metadata=metadata, timeout=WAIT
            )
            assert (REQUEST_ID_KEY, "req-42") in call.trailing_metadata()
    finally:
        live.stop()
    (line,) = [json.loads(text) for text in lines if '"req-42"' in text]
    assert line["event"] == "request" and line["method"].endswith("GRPCInferenceService/ModelInfer")
    assert (line["model"], line["version"], line["rows"], line["status"]) == (MODEL, 1, 3, "OK")
    assert line["batch_rows"] == 3 and line["queue_ms"] >= 0 and line["compute_ms"] > 0
    assert line["peer"].startswith("ipv")  # e.g. ipv4:127.0.0.1:port

    finished = exporter.get_finished_spans()
    (root,) = [s for s in finished if s.parent is not None and s.parent.is_remote]
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert format(root.parent.span_id, "016x") == PARENT_SPAN_ID
    attributes = dict(root.attributes)
    assert attributes["aet.request_id"] == "req-42" and attributes["aet.model"] == MODEL
    assert attributes["aet.rows"] == 3 and attributes["aet.batch_rows"] == 3
    children = {s.name: s for s in finished if s.parent is not None and not s.parent.is_remote}
    assert set(children) == {"receive", "queue", "compute", "reply"}
    assert all(child.parent.span_id == root.context.span_id for child in children.values())
    assert children["compute"].attributes["aet.batch_rows"] == 3
    assert children["compute"].end_time > children["compute"].start_time

    # Neither carries a token or a tensor value.
    exported = "".join(lines) + "".join(s.to_json() for s in finished)
    assert TOKEN not in exported
    assert not any(f"{value:.4f}" in exported for value in pixels.ravel()[:20])


def test_ids_are_generated_echoed_and_kept_for_failures_and_streams(tmp_path, lines):
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path)
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            _, call = stub.ModelInfer.with_call(kserve_request(digits_pixels(2)), timeout=WAIT)
            generated = dict(call.trailing_metadata())[REQUEST_ID_KEY]
            assert len(generated) == 32
            with pytest.raises(grpc.RpcError) as caught:  # wrong shape: refused, still logged
                stub.ModelInfer(kserve_request(digits_pixels(2)[:, :, :, :7].copy(), id="bad-1"))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            embed = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            requests = [
                embedding_pb2.EmbedRequest(
                    model=MODEL, inputs=encode_tensor(digits_pixels(1)), request_id=f"s-{i}"
                )
                for i in range(2)
            ]
            responses = embed.EmbedStream(iter(requests), metadata=[(REQUEST_ID_KEY, "stream-7")])
            assert [r.request_id for r in responses] == ["s-0", "s-1"]
            assert (REQUEST_ID_KEY, "stream-7") in responses.trailing_metadata()
    finally:
        live.stop()
    logged = {entry["request_id"]: entry for entry in map(json.loads, lines)}
    assert logged[generated]["status"] == "OK"
    assert logged["bad-1"]["status"] == "INVALID_ARGUMENT" and logged["bad-1"]["rows"] == 0
    assert logged["s-0"]["method"].endswith("EmbeddingService/EmbedStream")
    assert "s-1" in logged


def test_an_http_request_is_logged_and_traced_the_same_way(tmp_path, lines, spans):
    tracer, exporter = spans
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, tracer=tracer, http_port=0)
    pixels = digits_pixels(2)
    body = {
        "id": "body-id",
        "inputs": [
            {
                "name": "pixels",
                "datatype": "FP32",
                "shape": list(pixels.shape),
                "data": pixels.ravel().tolist(),
            }
        ],
    }
    try:
        connection = http.client.HTTPConnection("127.0.0.1", live.http_port, timeout=WAIT)
        connection.request(
            "POST",
            f"/v2/models/{MODEL}/infer",
            json.dumps(body),
            {"Content-Type": "application/json", "traceparent": TRACEPARENT},
        )
        answer = connection.getresponse()
        answer.read()
        connection.close()
    finally:
        live.stop()
    assert answer.status == 200 and answer.getheader(REQUEST_ID_KEY) == "body-id"
    (line,) = [json.loads(text) for text in lines if '"body-id"' in text]
    assert line["method"] == f"POST /v2/models/{MODEL}/infer" and line["rows"] == 2
    assert line["status"] == "OK" and line["peer"].startswith("127.0.0.1:")
    (root,) = [s for s in exporter.get_finished_spans() if s.parent and s.parent.is_remote]
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.attributes["aet.request_id"] == "body-id"


def test_access_log_can_be_turned_off(tmp_path, lines):
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, access_log=False)
    try:
        with grpc.insecure_channel(live.target) as channel:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                kserve_request(digits_pixels(1)), timeout=WAIT
            )
    finally:
        live.stop()
    assert lines == []


@pytest.mark.parametrize(
    "env, traced",
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"}, False),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, False),
    ],
)
def test_tracing_is_configured_only_by_the_otel_environment(monkeypatch, env, traced):
    for key in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert (tracer_from_environment() is not None) == traced


def test_an_unknown_exporter_is_named(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(UserError, match="OTEL_TRACES_EXPORTER: expected otlp, console or none"):
        tracer_from_environment()


@pytest.mark.parametrize("given", ["", "has space", "x" * 129, "tab\there", "é"])
def test_an_unusable_client_id_is_replaced(given):
    assert request_id(given) != given and len(request_id(given)) == 32


def test_server_ready_request_is_not_logged(tmp_path, lines):
    """Health and metadata calls are not requests of a model: no access-log line."""
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path)
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=WAIT).ready
    finally:
        live.stop()
    assert lines == []
