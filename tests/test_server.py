"""The embedding server end to end: real exported digits encoder, real gRPC on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aet.config import ConfigError, config_from_mapping
from aet.proto import embedding_pb2 as pb
from aet.proto import embedding_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from aet.proto.codec import decode_tensor, encode_tensor
from aet.repository import MODEL_FILE, read_model_card, scan_repository, write_version
from aet.server.app import ServeConfig
from aet.server.auth import BearerTokenInterceptor
from aet.training.checkpoint import load_checkpoint
from aet.training.export import ExportedEncoder, Scale

WAIT = 20.0  # seconds; safety net against hangs, never a measured quantity
STATE = pb.ModelVersionState.State
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def pixels(digits_dataset) -> np.ndarray:
    """Held-out digits in the raw range the graph takes: (N, 1, 8, 8) float32 in [0, 16]."""
    return (digits_dataset.test.x * np.float32(digits_dataset.raw_max)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(model_repository):
    """In-process onnxruntime on the exported graph."""
    session = ort.InferenceSession(
        str(model_repository / "digits" / "1" / MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    return lambda x: session.run(["embedding"], {"pixels": x})[0]


@pytest.fixture(scope="module")
def tampered_repository(tmp_path_factory, model_repository) -> Path:
    """digits/1 (good), digits/2 and broken/1 whose model.onnx no longer matches its sha256."""
    root = tmp_path_factory.mktemp("tampered")
    shutil.copytree(model_repository / "digits" / "1", root / "digits" / "1")
    card = read_model_card(model_repository / "digits" / "1" / "model.json")
    onnx_bytes = (model_repository / "digits" / "1" / MODEL_FILE).read_bytes()
    for name in ("digits", "broken"):
        folder = write_version(root, name, onnx_bytes, dataclasses.replace(card, name=name))
        with open(folder / MODEL_FILE, "ab") as handle:
            handle.write(b"\0")  # one byte more: the sha256 no longer matches
    return root


def embed_request(x: np.ndarray, model: str = "digits", **fields) -> pb.EmbedRequest:
    return pb.EmbedRequest(model=model, inputs=encode_tensor(x), **fields)


def embeddings(response: pb.EmbedResponse) -> np.ndarray:
    return decode_tensor(response.embeddings, "embeddings")


def hold_first_batch(model, until: callable) -> threading.Event:
    """Keep `model`'s batcher busy after its next batch until `until()` or the returned event."""
    release = threading.Event()
    listeners = model.batcher.stats.listeners

    def hold(record):
        listeners.remove(hold)
        deadline = time.monotonic() + WAIT
        while not (until() or release.is_set()) and time.monotonic() < deadline:
            time.sleep(0.001)

    listeners.append(hold)
    return release


def wait_for(condition: callable) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


# -- embeddings ------------------------------------------------------------------------------


def test_embeddings_equal_onnxruntime_in_process_and_the_pytorch_encoder(
    embedding_server, embedding_stub, pixels, reference, digits_checkpoint, digits_dataset
):
    stub = embedding_stub(embedding_server)
    batch = pixels[:100]
    response = stub.Embed(embed_request(batch, request_id="req-7"), timeout=WAIT)
    got = embeddings(response)
    assert (response.request_id, response.model, response.version) == ("req-7", "digits", 1)
    assert got.shape == (100, 8) and got.dtype == np.float32
    assert np.abs(got - reference(batch)).max() <= 1e-5
    encoder = ExportedEncoder(
        load_checkpoint(digits_checkpoint).build_model(),
        Scale(digits_dataset.raw_max),
        with_score=False,
    ).eval()
    with torch.no_grad():
        expected = encoder(torch.from_numpy(batch)).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_uint8_requests_equal_float32_requests(embedding_server, embedding_stub, pixels):
    stub = embedding_stub(embedding_server)
    as_uint8 = pixels[:20].round().astype(np.uint8)  # digits pixels are integers 0..16
    from_uint8 = embeddings(stub.Embed(embed_request(as_uint8), timeout=WAIT))
    from_float = embeddings(stub.Embed(embed_request(as_uint8.astype(np.float32)), timeout=WAIT))
    np.testing.assert_array_equal(from_uint8, from_float)


def test_l2_normalised_and_float16_outputs(embedding_server, embedding_stub, pixels, reference):
    stub = embedding_stub(embedding_server)
    options = pb.EmbedOptions(l2_normalize=True, float16_output=True)
    got = embeddings(stub.Embed(embed_request(pixels[:30], options=options), timeout=WAIT))
    assert got.dtype == np.float16
    want = reference(pixels[:30])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got.astype(np.float32), want, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float32), axis=1), 1.0, atol=2e-3)


def test_concurrent_callers_share_batches_and_each_gets_its_own_rows_in_order(
    model_repository, start_server, embedding_stub, pixels, reference
):
    running = start_server(model_repository)
    stub = embedding_stub(running)
    model = running.registry.lookup("digits")
    records = []
    model.batcher.stats.listeners.append(records.append)
    callers = 8
    hold_first_batch(model, until=lambda: model.batcher.queued_requests >= callers - 1)
    # caller i sends rows [10 i, 10 i + i + 1); one more sends NaN and must not disturb them
    requests = {i: pixels[10 * i : 10 * i + i + 1] for i in range(callers)}
    bad = pixels[:2].copy()
    bad[1, 0, 3, 3] = np.nan
    results, errors = {}, {}

    def call(i, x):
        try:
            results[i] = embeddings(stub.Embed(embed_request(x, request_id=str(i)), timeout=WAIT))
        except grpc.RpcError as exc:
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i, x)) for i, x in requests.items()]
    threads.append(threading.Thread(target=call, args=("bad", bad)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert set(errors) == {"bad"}
    assert errors["bad"].code() == grpc.StatusCode.INVALID_ARGUMENT
    for i, x in requests.items():
        np.testing.assert_allclose(results[i], reference(x), atol=1e-5)
    assert max(r.requests for r in records) == callers - 1  # all the held-back callers at once
    assert sum(r.rows for r in records) == sum(len(x) for x in requests.values())


def test_a_stream_of_100_batches_returns_100_responses_in_order(
    embedding_server, embedding_stub, pixels, reference
):
    stub = embedding_stub(embedding_server)
    batches = [pixels[i : i + 1 + i % 7] for i in range(100)]
    requests = (embed_request(x, request_id=f"batch-{i}") for i, x in enumerate(batches))
    responses = list(stub.EmbedStream(requests, timeout=WAIT))
    assert [r.request_id for r in responses] == [f"batch-{i}" for i in range(100)]
    for x, response in zip(batches, responses, strict=True):
        np.testing.assert_allclose(embeddings(response), reference(x), atol=1e-5)


def test_a_bad_request_ends_the_stream_naming_its_request_id(
    embedding_server, embedding_stub, pixels
):
    stub = embedding_stub(embedding_server)
    requests = [
        embed_request(pixels[:2], request_id="ok"),
        embed_request(pixels[:2, :, :4], request_id="too-narrow"),
    ]
    answered = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in stub.EmbedStream(iter(requests), timeout=WAIT):
            answered.append(response.request_id)
    assert answered == ["ok"]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("request_id 'too-narrow': inputs.shape: expected")


def test_responses_say_where_the_server_spent_its_time(embedding_server, embedding_stub, pixels):
    timing = embedding_stub(embedding_server).Embed(embed_request(pixels[:4]), timeout=WAIT).timing
    assert timing.decode_us > 0 and timing.run_us > 0 and timing.encode_us > 0
    assert timing.queue_us >= 0


# -- errors: every row of DESIGN.md's table ---------------------------------------------------


def nan_at(x: np.ndarray, value: float) -> np.ndarray:
    x = x.copy()
    x[-1, 0, 0, 0] = value
    return x


ONE_ROW = encode_tensor(np.ones((1, 1, 8, 8), np.float32))


def bad(model="digits", version=0, inputs=ONE_ROW) -> pb.EmbedRequest:
    return pb.EmbedRequest(model=model, version=version, inputs=inputs)


@pytest.mark.parametrize(
    "bad_request, code, message",
    [
        (
            bad(model="nope"),
            grpc.StatusCode.NOT_FOUND,
            r"^model: expected one of \['digits'\], got 'nope'$",
        ),
        (
            bad(version=9),
            grpc.StatusCode.NOT_FOUND,
            r"^version: model 'digits' has versions \[1\], got 9$",
        ),
        (
            bad(inputs=encode_tensor(np.zeros((2, 1, 8, 4), np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"^inputs\.shape: expected \[batch, 1, 8, 8\], got \[2, 1, 8, 4\]$",
        ),
        (
            bad(inputs=encode_tensor(np.zeros((2, 1, 8, 8), np.float16))),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"^inputs\.dtype: expected float32 or uint8, got float16$",
        ),
        (
            bad(inputs=pb.Tensor(dtype=pb.FLOAT32, shape=[2, 1, 8, 8], data=bytes(100))),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"^inputs\.data: expected 512 bytes for shape \[2, 1, 8, 8\] of float32, "
            r"got 100 bytes$",
        ),
        (
            bad(inputs=pb.Tensor(dtype=pb.DATA_TYPE_UNSPECIFIED, shape=[1, 1, 8, 8])),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"^inputs\.dtype: expected one of FLOAT32, UINT8, FLOAT16",
        ),
        (
            bad(inputs=encode_tensor(nan_at(np.ones((3, 1, 8, 8), np.float32), np.nan))),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"^inputs\.data: expected finite values, got NaN or Inf in row 2",
        ),
        (
            bad(inputs=encode_tensor(nan_at(np.ones((3, 1, 8, 8), np.float32), -np.inf))),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"^inputs\.data: expected finite values, got NaN or Inf in row 2",
        ),
        (
            bad(inputs=encode_tensor(np.zeros((0, 1, 8, 8), np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"^inputs\.shape\[0\]: expected at least 1 row, got 0",
        ),
        (
            bad(inputs=encode_tensor(np.zeros((33, 1, 8, 8), np.float32))),
            grpc.StatusCode.INVALID_ARGUMENT,
            r"^inputs\.shape\[0\]: expected at most 32 rows per request, got 33$",
        ),
    ],
)
def test_bad_requests_get_their_status_and_a_message_naming_the_field(
    model_repository, start_server, embedding_stub, bad_request, code, message
):
    running = start_server(model_repository, max_request_rows=32)
    with pytest.raises(grpc.RpcError) as caught:
        embedding_stub(running).Embed(bad_request, timeout=WAIT)
    assert caught.value.code() == code
    assert re.search(message, caught.value.details()), caught.value.details()


def test_full_queue_is_resource_exhausted(model_repository, start_server, embedding_stub, pixels):
    running = start_server(model_repository, max_queue_size=2)
    stub = embedding_stub(running)
    model = running.registry.lookup("digits")
    release = hold_first_batch(model, until=lambda: False)
    busy = stub.Embed.future(embed_request(pixels[:1]), timeout=WAIT)
    wait_for(lambda: model.batcher.stats.batches == 1)
    queued = [stub.Embed.future(embed_request(pixels[:1]), timeout=WAIT) for _ in range(2)]
    wait_for(lambda: model.batcher.queued_requests == 2)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(embed_request(pixels[:1]), timeout=WAIT)
    release.set()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full (2 requests waiting)" in caught.value.details()
    assert all(f.result().embeddings.shape == [1, 8] for f in [busy, *queued])


def test_request_whose_deadline_passes_in_the_queue_is_dropped(
    model_repository, start_server, embedding_stub, pixels
):
    running = start_server(model_repository)
    stub = embedding_stub(running)
    model = running.registry.lookup("digits")
    release = hold_first_batch(model, until=lambda: False)
    busy = stub.Embed.future(embed_request(pixels[:1]), timeout=WAIT)
    wait_for(lambda: model.batcher.stats.batches == 1)
    late = stub.Embed.future(embed_request(pixels[:3]), timeout=0.2)
    with pytest.raises(grpc.RpcError) as caught:
        late.result()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    release.set()
    busy.result()
    wait_for(lambda: model.batcher.stats.dropped_deadline == 1)
    assert model.batcher.stats.rows == 1  # the late request's 3 rows never ran


def test_request_cancelled_by_its_client_is_dropped(
    model_repository, start_server, embedding_stub, pixels, monkeypatch
):
    running = start_server(model_repository)
    stub = embedding_stub(running)
    model = running.registry.lookup("digits")
    caller_gone = []  # the server's own test of each submitted request's call
    submit = model.batcher.submit

    def recording_submit(inputs, deadline=None, is_cancelled=None):
        caller_gone.append(is_cancelled)
        return submit(inputs, deadline, is_cancelled)

    monkeypatch.setattr(model.batcher, "submit", recording_submit)
    release = hold_first_batch(model, until=lambda: False)
    busy = stub.Embed.future(embed_request(pixels[:1]), timeout=WAIT)
    wait_for(lambda: model.batcher.stats.batches == 1)
    gone = stub.Embed.future(embed_request(pixels[:3]), timeout=WAIT)
    wait_for(lambda: model.batcher.queued_requests == 1)
    assert gone.cancel()
    wait_for(caller_gone[1])  # the cancellation has crossed loopback to the server
    release.set()
    busy.result()
    wait_for(lambda: model.batcher.stats.dropped_cancelled == 1)
    assert model.batcher.stats.rows == 1  # the cancelled request's 3 rows never ran


def test_unauthenticated_when_auth_is_on(model_repository, start_server, embedding_stub, pixels):
    running = start_server(model_repository, interceptors=[BearerTokenInterceptor({"s3cret"})])
    stub = embedding_stub(running)
    with pytest.raises(grpc.RpcError) as caught:
        stub.Embed(embed_request(pixels[:1]), timeout=WAIT)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    response = stub.Embed(
        embed_request(pixels[:1]), timeout=WAIT, metadata=[("authorization", "Bearer s3cret")]
    )
    assert embeddings(response).shape == (1, 8)


# -- tampered models, listing, health, reflection ---------------------------------------------


def test_tampered_versions_are_refused_while_the_rest_serve(
    tampered_repository, start_server, embedding_stub, pixels, reference
):
    running = start_server(tampered_repository)
    stub = embedding_stub(running)
    response = stub.Embed(embed_request(pixels[:5]), timeout=WAIT)  # latest READY: version 1
    assert response.version == 1
    np.testing.assert_allclose(embeddings(response), reference(pixels[:5]), atol=1e-5)
    for model, version in (("digits", 2), ("broken", 0)):
        with pytest.raises(grpc.RpcError) as caught:
            stub.Embed(embed_request(pixels[:1], model=model, version=version), timeout=WAIT)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "sha256 mismatch" in caught.value.details()
    listing = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=WAIT).models}
    assert listing["digits"].latest_version == 1
    assert [(v.version, v.state) for v in listing["digits"].versions] == [
        (1, STATE.READY),
        (2, STATE.FAILED),
    ]
    assert listing["broken"].latest_version == 0
    assert "sha256 mismatch" in listing["broken"].versions[0].reason


def test_describe_model(embedding_server, embedding_stub, model_repository):
    description = embedding_stub(embedding_server).DescribeModel(
        pb.DescribeModelRequest(model="digits"), timeout=WAIT
    )
    card = read_model_card(model_repository / "digits" / "1" / "model.json")
    assert (description.name, description.version, description.embedding_dim) == ("digits", 1, 8)
    assert (description.input.name, list(description.input.shape)) == ("pixels", [1, 8, 8])
    assert list(description.input.accepted_dtypes) == [pb.FLOAT32, pb.UINT8]
    assert (description.input.min_value, description.input.max_value) == (0.0, 16.0)
    assert (description.output.name, list(description.output.shape)) == ("embedding", [8])
    assert description.execution_provider == "CPUExecutionProvider"
    assert (description.batching.max_batch_size, description.batching.max_request_rows) == (
        64,
        16384,
    )
    assert description.sha256 == card.sha256
    assert json.loads(description.model_card_json)["dataset"] == card.dataset


def health_of(running, service: str):
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
            .status
        )


def test_health_follows_model_state(tampered_repository, start_server):
    running = start_server(tampered_repository)
    for service in ("", "aet.v1.EmbeddingService", "digits"):
        assert health_of(running, service) == SERVING
    assert health_of(running, "broken") == NOT_SERVING  # every version refused
    with pytest.raises(grpc.RpcError) as caught:
        health_of(running, "never-heard-of")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

    running.registry.unload("digits", 1)
    assert health_of(running, "digits") == NOT_SERVING
    assert health_of(running, "") == NOT_SERVING  # no model left to serve

    found = next(
        v for v in scan_repository(tampered_repository) if (v.name, v.version) == ("digits", 1)
    )
    running.registry.load(found)
    assert health_of(running, "digits") == SERVING
    assert health_of(running, "") == SERVING


def test_reflection_lists_the_services(embedding_server):
    with grpc.insecure_channel(f"127.0.0.1:{embedding_server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            stub.ServerReflectionInfo(
                iter(
                    [
                        reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(
                            file_containing_symbol="aet.v1.EmbeddingService"
                        ),
                    ]
                ),
                timeout=WAIT,
            )
        )
    names = {s.name for s in answers[0].list_services_response.service}
    assert {
        "aet.v1.EmbeddingService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert answers[1].file_descriptor_response.file_descriptor_proto  # clients can decode it


# -- configuration and process lifecycle ------------------------------------------------------


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^port: expected 0\.\.65535, got 70000$"):
        ServeConfig(port=70000)
    with pytest.raises(ConfigError, match=r"^max_batch_size: expected at least 1, got 0$"):
        config_from_mapping(ServeConfig, {"max_batch_size": 0})
    with pytest.raises(ConfigError, match=r"^model_instances: expected at least 1, got 0$"):
        config_from_mapping(ServeConfig, {"model_instances": 0})
    with pytest.raises(ConfigError, match=r"^intra_op_threads: expected 0 or more, got -1$"):
        config_from_mapping(ServeConfig, {"intra_op_threads": -1})
    nested = config_from_mapping(ServeConfig, {"batching": {"model_instances": 2}, "device": "cpu"})
    assert nested.batching.model_instances == 2 and nested.runtime.device == "cpu"


def serve_process(repository: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "aet.server",
            "serve",
            "--repository",
            str(repository),
            "--port",
            "0",
            "--intra-op-threads",
            "1",
            "--inter-op-threads",
            "1",
            "--drain-seconds",
            "0",
            *flags,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def read_events(process: subprocess.Popen, events: queue.Queue) -> None:
    for line in process.stderr:
        events.put(json.loads(line))


def next_event(events: queue.Queue, name: str) -> dict:
    deadline = time.monotonic() + WAIT
    while True:
        event = events.get(timeout=max(0.0, deadline - time.monotonic()))
        if event["event"] == name:
            return event


def test_aet_serve_wires_both_apis_and_metrics(model_repository, pixels):
    process = serve_process(model_repository, "--metrics-port", "0")
    events: queue.Queue = queue.Queue()
    threading.Thread(target=read_events, args=(process, events), daemon=True).start()
    try:
        started = next_event(events, "server_started")
        next_event(events, "server_ready")
        with grpc.insecure_channel(f"127.0.0.1:{started['port']}") as channel:
            kserve = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert kserve.ModelReady(
                grpc_service_pb2.ModelReadyRequest(name="digits"), timeout=WAIT
            ).ready
            embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
                embed_request(pixels[:3]), timeout=WAIT
            )
        url = f"http://127.0.0.1:{started['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=WAIT) as page:
            exposition = page.read().decode()
        assert (
            'aet_requests_total{api="embed",model="digits",outcome="success",version="1"} 1.0'
            in exposition
        )
        process.send_signal(signal.SIGINT)
        assert process.wait(WAIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_missing_repository_exits_2_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    process = serve_process(missing)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert f"model repository {missing}: not a directory" in stderr


def test_sigterm_under_load_finishes_in_flight_work_and_exits_0(
    model_repository, pixels, reference
):
    process = serve_process(model_repository, "--grace-period", "20")
    events: queue.Queue = queue.Queue()
    threading.Thread(target=read_events, args=(process, events), daemon=True).start()
    try:
        port = next_event(events, "server_started")["port"]
        next_event(events, "server_ready")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        health_updates = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=""), timeout=WAIT
        )
        assert next(health_updates).status == SERVING

        # An extraction-style stream in flight when the signal arrives ...
        outgoing: queue.Queue = queue.Queue()
        responses = stub.EmbedStream(iter(outgoing.get, None), timeout=WAIT)
        outgoing.put(embed_request(pixels[:4], request_id="before"))
        assert next(responses).request_id == "before"
        # ... and unary callers hammering it.
        outcomes: list[grpc.StatusCode] = []
        stop_callers = threading.Event()

        def caller():
            while not stop_callers.is_set():
                try:
                    stub.Embed(embed_request(pixels[:8]), timeout=WAIT)
                    outcomes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())
                    return

        callers = [threading.Thread(target=caller) for _ in range(4)]
        for thread in callers:
            thread.start()
        wait_for(lambda: len(outcomes) >= 20)
        process.send_signal(signal.SIGTERM)
        next_event(events, "shutdown_started")

        assert next(health_updates).status == NOT_SERVING
        health_updates.cancel()  # a watch is a call in flight too: end it, not the grace period
        for i in range(5):  # the in-flight stream keeps working through the grace period
            outgoing.put(embed_request(pixels[i : i + 3], request_id=f"after-{i}"))
            response = next(responses)
            assert response.request_id == f"after-{i}"
            np.testing.assert_allclose(
                embeddings(response), reference(pixels[i : i + 3]), atol=1e-5
            )
        outgoing.put(None)
        assert list(responses) == []
        with pytest.raises(grpc.RpcError) as caught:  # new work is refused
            stub.Embed(embed_request(pixels[:1]), timeout=WAIT)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        stop_callers.set()
        for thread in callers:
            thread.join(WAIT)
        # A unary call racing the signal is either answered or refused (gRPC refuses calls that
        # reach a stopping server as UNAVAILABLE or CANCELLED); nothing fails otherwise.
        refused = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
        assert set(outcomes) <= {grpc.StatusCode.OK} | refused
        assert process.wait(WAIT) == 0
        assert next_event(events, "shutdown_finished")["drained"] is True
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
