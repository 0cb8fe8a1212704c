"""The fault catalogue (docs/FAULTS.md): what a hostile or careless client, or a changing model
repository, tries, and what the server answers. Each test reproduces one fault that once hung,
starved, bloated or confused the server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kserve_harness import (
    ADMIN,
    MODEL,
    BatchGate,
    add_version,
    digits_pixels,
    encoder_onnx,
    kserve_request,
    kserve_stub,
    start_kserve_server,
)

from aet.config import ConfigError
from aet.encoder import Encoder
from aet.errors import UserError
from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto import grpc_service_pb2 as pb
from aet.proto.codec import encode_tensor
from aet.repository import CARD_FILE, MODEL_FILE, InputSpec, ModelCard, OutputSpec, write_version
from aet.server.app import ServeConfig
from aet.server.auth import TokenCheck
from aet.server.errors import MAX_MESSAGE_CHARS
from aet.server.metrics import ServingMetrics
from aet.server.models import ModelState

WAIT = 60.0  # seconds; a safety net against hangs, never a measured quantity
SEED = 5
TOKEN = "fault-token-7"
GARBAGE = b"\xff\xfe" * 50  # not a valid protobuf message
SHORT = 300  # a status message quoting a client string stays under this many characters


def embed(pixels: np.ndarray, **fields) -> embedding_pb2.EmbedRequest:
    return embedding_pb2.EmbedRequest(inputs=encode_tensor(pixels), **{"model": MODEL, **fields})


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    repository = tmp_path_factory.mktemp("repository")
    add_version(repository, SEED)
    server = start_kserve_server(repository)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def channel(live):
    with grpc.insecure_channel(live.target) as channel:
        yield channel


# -- 1. shutdown can always end ------------------------------------------------------------


def serve_process(repository: Path, *flags: str) -> tuple[subprocess.Popen, queue.Queue]:
    """`aet serve` in a child process, and a queue of its JSON log events."""
    process = subprocess.Popen(
        [sys.executable, "-m", "aet.server", "serve", "--repository", str(repository)]
        + ["--port", "0", "--intra-op-threads", "1", "--inter-op-threads", "1"]
        + ["--drain-seconds", "0", *flags],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    events: queue.Queue = queue.Queue()

    def read() -> None:
        for line in process.stderr:
            try:
                events.put(json.loads(line))
            except json.JSONDecodeError:
                events.put({"event": "text", "line": line})

    threading.Thread(target=read, daemon=True).start()
    return process, events


def next_event(events: queue.Queue, name: str) -> dict:
    while True:
        event = events.get(timeout=WAIT)
        if event["event"] == name:
            return event


def test_sigterm_after_unparsable_stream_bodies_still_exits(tmp_path):
    """grpc's own stop() never finished after streams whose body is not protobuf: the
    server logged shutdown_started and hung; now the wait is bounded and the exit clean."""
    add_version(tmp_path, SEED)
    process, events = serve_process(tmp_path, "--grace-period", "1")
    try:
        port = next_event(events, "server_started")["port"]
        next_event(events, "server_ready")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in ["/inference.GRPCInferenceService/ModelStreamInfer"] * 20 + [
                "/aet.v1.EmbeddingService/EmbedStream"
            ] * 5:
                with pytest.raises(grpc.RpcError):
                    list(channel.stream_stream(method)(iter([GARBAGE]), timeout=WAIT))
        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0  # a hang fails here, after the safety net
        assert next_event(events, "shutdown_finished")["calls_cut"] == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_stop_reports_work_cut_when_the_grace_period_runs_out(tmp_path):
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, max_batch_size=1, max_request_rows=10)
    gate = BatchGate(live.registry.lookup(MODEL))
    try:
        with grpc.insecure_channel(live.target) as channel:
            held = kserve_stub(channel).ModelInfer.future(
                kserve_request(digits_pixels(10)), timeout=WAIT
            )
            gate.wait_entered()
            assert live.running.stop(grace_period=0.1) is False  # returns although work is held
            gate.open()
            with pytest.raises(grpc.RpcError):
                held.result()
    finally:
        gate.open()
        live.metrics_endpoint.close()


# -- 2. idle streams cannot starve the server ------------------------------------------------


def test_idle_streams_beyond_the_limit_are_refused_and_unary_and_health_still_answer(tmp_path):
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, workers=6, max_streams=3)
    outgoing: list[queue.Queue] = []
    streams = []  # kept: a dropped call object cancels its stream
    try:
        with grpc.insecure_channel(live.target) as channel:
            kserve = kserve_stub(channel)
            embedder = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            outcomes = []
            for i in range(8):  # more idle streams than handler threads
                requests: queue.Queue = queue.Queue()
                outgoing.append(requests)
                if i % 2:
                    requests.put(kserve_request(digits_pixels(1)))
                    answers = kserve.ModelStreamInfer(iter(requests.get, None), timeout=WAIT)
                else:
                    requests.put(embed(digits_pixels(1)))
                    answers = embedder.EmbedStream(iter(requests.get, None), timeout=WAIT)
                streams.append(answers)
                try:
                    next(answers)  # answered, and the stream stays open
                    outcomes.append("open")
                except grpc.RpcError as exc:
                    outcomes.append(exc.code())
                    assert "--max-streams 3" in exc.details()
            assert outcomes.count("open") == 3
            assert outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 5
            reply = embedder.Embed(embed(digits_pixels(2)), timeout=WAIT)
            assert list(reply.embeddings.shape) == [2, 4]
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=WAIT
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        for requests in outgoing:
            requests.put(None)
        live.stop()


# -- 3. a stream's read-ahead is bounded -------------------------------------------------------


@pytest.mark.parametrize("window, window_mb", [(4, 8.0), (64, 0.01)])
def test_a_stream_reads_ahead_at_most_one_window(tmp_path, window, window_mb):
    """The model is held busy; a client sends 40 requests and reads nothing until the end.
    The server starts requests only while the window has room (count or bytes)."""
    add_version(tmp_path, SEED)
    live = start_kserve_server(
        tmp_path,
        max_batch_size=1,
        max_request_rows=64,
        stream_window=window,
        stream_window_mb=window_mb,
    )
    model = live.registry.lookup(MODEL)
    gate = BatchGate(model)
    requests = [kserve_request(digits_pixels(8, seed=i), id=str(i)) for i in range(40)]
    first_size, largest = requests[0].ByteSize(), max(r.ByteSize() for r in requests)
    window_bytes = round(window_mb * (1 << 20))
    expected = min(window, -(-window_bytes // first_size))  # read before the window is full
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = kserve_stub(channel)
            held = stub.ModelInfer.future(kserve_request(digits_pixels(2)), timeout=WAIT)
            gate.wait_entered()  # one row ran; the other waits behind the held batch
            answers = stub.ModelStreamInfer(iter(requests), timeout=WAIT)
            queued = model.batcher
            poll_until(lambda: queued.queued_requests == 1 + expected)
            gate.open()
            assert [a.infer_response.id for a in answers] == [str(i) for i in range(40)]
            held.result()
    finally:
        gate.open()
        live.stop()
    assert live.config.window.peak_requests == expected
    assert live.config.window.peak_bytes <= window_bytes + largest


def poll_until(condition) -> None:
    """Wait for a condition that must eventually hold (safety net: WAIT)."""
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition never held")


# -- 4. status codes and bounded messages -----------------------------------------------------

HUGE = "x" * 10_000


def kserve_call(channel, request):
    return kserve_stub(channel).ModelInfer(request, timeout=WAIT)


def embed_call(channel, request):
    return embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(request, timeout=WAIT)


def shaped(pixels: np.ndarray, shape: list[int]) -> pb.ModelInferRequest:
    request = kserve_request(pixels)
    request.inputs[0].shape[:] = shape
    return request


STATUS_CASES = {
    "kserve shape of 70 dimensions": (
        kserve_call,
        lambda: shaped(digits_pixels(1), [1] * 70),
        grpc.StatusCode.INVALID_ARGUMENT,
        "(70 dimensions)",
    ),
    "embed shape of 70 dimensions": (
        embed_call,
        lambda: embedding_pb2.EmbedRequest(
            model=MODEL,
            inputs=embedding_pb2.Tensor(
                dtype=embedding_pb2.FLOAT32, shape=[1] * 70, data=b"\0\0\0\0"
            ),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "(70 dimensions)",
    ),
    "kserve version of 4,301 digits": (
        kserve_call,
        lambda: kserve_request(digits_pixels(1), model_version="9" * 4301),
        grpc.StatusCode.INVALID_ARGUMENT,
        "(4301 characters)",
    ),
    "kserve fullwidth version digit": (
        kserve_call,
        lambda: kserve_request(digits_pixels(1), model_version="\uff11"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version: expected a positive integer of at most 19 ASCII digits",
    ),
    "kserve version -1": (
        kserve_call,
        lambda: kserve_request(digits_pixels(1), model_version="-1"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "model_version: expected a positive integer",
    ),
    "embed version -1": (
        embed_call,
        lambda: embed(digits_pixels(1), version=-1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "version: expected a positive integer",
    ),
    "kserve 10 KB model name": (
        kserve_call,
        lambda: kserve_request(digits_pixels(1), model_name=HUGE),
        grpc.StatusCode.NOT_FOUND,
        "(10000 characters)",
    ),
    "embed 10 KB model name": (
        embed_call,
        lambda: embed(digits_pixels(1), model=HUGE),
        grpc.StatusCode.NOT_FOUND,
        "(10000 characters)",
    ),
    "kserve 10 KB input name": (
        kserve_call,
        lambda: pb.ModelInferRequest(
            model_name=MODEL,
            inputs=[pb.ModelInferRequest.InferInputTensor(name=HUGE, datatype="FP32", shape=[1])],
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].name: expected 'pixels', got 'xxx",
    ),
    "model metadata of a 10 KB name": (
        lambda channel, request: kserve_stub(channel).ModelMetadata(request, timeout=WAIT),
        lambda: pb.ModelMetadataRequest(name=HUGE),
        grpc.StatusCode.NOT_FOUND,
        "(10000 characters)",
    ),
}


@pytest.mark.parametrize("name", STATUS_CASES)
def test_bad_request_gets_its_status_and_a_bounded_message(channel, name):
    call, request, code, fragment = STATUS_CASES[name]
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, request())
    assert caught.value.code() == code, caught.value.details()
    assert fragment in caught.value.details()
    assert len(caught.value.details()) < SHORT


def test_a_stream_error_quotes_a_20_kb_request_id_as_an_excerpt(channel):
    bad = embed(digits_pixels(1), request_id="r" * 20_000)
    bad.inputs.shape[:] = [1, 1, 8, 7]
    stream = embedding_pb2_grpc.EmbeddingServiceStub(channel).EmbedStream(iter([bad]), timeout=WAIT)
    with pytest.raises(grpc.RpcError) as caught:
        list(stream)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("request_id 'rrrr")
    assert "(20000 characters)" in caught.value.details()
    assert len(caught.value.details()) < SHORT


def test_unauthenticated_garbage_is_unauthenticated_not_parsed(tmp_path):
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, tokens=(TOKEN,))
    try:
        with grpc.insecure_channel(live.target) as channel:
            for method in (
                "/inference.GRPCInferenceService/ModelInfer",
                "/aet.v1.EmbeddingService/Embed",
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary(method)(GARBAGE, timeout=WAIT)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        live.stop()


def test_unauthenticated_health_watches_cannot_take_the_stream_slots(tmp_path):
    """Issue 24 #3/#4: `--max-streams 3` and tokens on; three Watch calls without a token are
    refused at once, so an authenticated stream still gets a slot; per-model health needs a
    token, overall health does not."""
    add_version(tmp_path, SEED)
    live = start_kserve_server(tmp_path, tokens=(TOKEN,), workers=6, max_streams=3)
    bearer = [("authorization", f"Bearer {TOKEN}")]
    try:
        with grpc.insecure_channel(live.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=WAIT) for _ in "abc"]
            for watch in watches:
                with pytest.raises(grpc.RpcError) as caught:
                    next(watch)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answers = kserve_stub(channel).ModelStreamInfer(
                iter([kserve_request(digits_pixels(1))]), metadata=bearer, timeout=WAIT
            )
            assert not next(answers).error_message
            overall = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)
            assert overall.status == health_pb2.HealthCheckResponse.SERVING
            for name in (MODEL, "no-such-model"):
                with pytest.raises(grpc.RpcError) as caught:
                    health.Check(health_pb2.HealthCheckRequest(service=name), timeout=WAIT)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            per_model = health.Check(
                health_pb2.HealthCheckRequest(service=MODEL), metadata=bearer, timeout=WAIT
            )
            assert per_model.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        live.stop()


def test_status_messages_are_cut_to_the_maximum():
    from aet.server.errors import InvalidArgument, grpc_status

    code, message = grpc_status(InvalidArgument("y" * 5000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(message) == MAX_MESSAGE_CHARS and message.endswith("...")


# -- 5. /metrics: port in use, tokens ---------------------------------------------------------


def test_metrics_port_in_use_exits_2_naming_it(tmp_path):
    add_version(tmp_path, SEED)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "aet.server", "serve", "--repository", str(tmp_path)]
            + ["--port", "0", "--metrics-port", str(port)],
            capture_output=True,
            text=True,
            timeout=WAIT,
        )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"metrics_port: cannot bind 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_can_require_the_bearer_token():
    endpoint = ServingMetrics(8).serve_http(0, token_check=TokenCheck([TOKEN]))
    url = f"http://127.0.0.1:{endpoint.port}/metrics"
    try:
        for header in (None, "Bearer guess"):
            request = urllib.request.Request(url)
            if header:
                request.add_header("Authorization", header)
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=WAIT)
            assert caught.value.code == 401
            assert TOKEN not in caught.value.read().decode()
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(request, timeout=WAIT) as reply:
            assert reply.status == 200 and b"aet_queue_depth" in reply.read()
    finally:
        endpoint.close()
    with pytest.raises(ConfigError, match="metrics_token: needs --token-file or --token-env"):
        ServeConfig(metrics_token=True)


# -- 6 and 7. hot reload of half-copied and vanished versions; no server paths ---------------


def test_a_version_copied_before_its_card_loads_once_the_card_arrives(tmp_path):
    repository, staging = tmp_path / "repository", tmp_path / "staging"
    add_version(repository, SEED)
    staged = add_version(staging, SEED + 1)
    staged = add_version(staging, SEED + 1)  # staging/digits/2: the next version, complete
    live = start_kserve_server(repository)
    try:
        copied = repository / MODEL / "2"
        copied.mkdir()
        shutil.copy(staged / MODEL_FILE, copied / MODEL_FILE)  # copied by hand, card still missing
        live.reloader.sync()
        status = {s.version: s for s in live.registry.statuses(MODEL)}[2]
        assert status.state == ModelState.FAILED
        assert status.reason.startswith(f"cannot read model card {MODEL}/2/{CARD_FILE}")
        shutil.copy(staged / CARD_FILE, copied / CARD_FILE)
        live.reloader.sync()
        assert {s.version: s.state for s in live.registry.statuses(MODEL)}[2] == ModelState.READY
        assert live.registry.lookup(MODEL).version == 2

        # A refused version whose folder is deleted is forgotten.
        broken = add_version(repository, SEED + 2)
        (broken / MODEL_FILE).write_bytes(encoder_onnx(seed=99))
        live.reloader.sync()
        assert {s.version: s.state for s in live.registry.statuses(MODEL)}[3] == ModelState.FAILED
        shutil.rmtree(broken)
        live.reloader.sync()
        assert [s.version for s in live.registry.statuses(MODEL)] == [1, 2]
    finally:
        live.stop()


def test_a_card_whose_embedding_dim_is_not_the_graphs_is_refused_at_load(tmp_path):
    """Issue 24 #6: card 16, graph 4: FAILED naming both (and `aet.Encoder` refuses it too),
    where it was READY with metadata saying 16 and answers of 4."""
    card = ModelCard.draft(
        MODEL,
        "linear",
        InputSpec("pixels", (1, 8, 8), "float32", (0.0, 16.0)),
        OutputSpec("embedding", "float32", 16),
        dataset={"name": "digits"},
    )
    folder = write_version(tmp_path, MODEL, encoder_onnx(SEED), card)
    live = start_kserve_server(tmp_path)
    try:
        (status,) = live.registry.statuses(MODEL)
    finally:
        live.stop()
    assert status.state == ModelState.FAILED
    assert (
        "output shape: expected [batch, 16] (model card output.embedding_dim), got ['batch', 4]"
        in status.reason
    )
    with pytest.raises(UserError, match=r"output shape: expected \[batch, 16\]"):
        Encoder.load(folder)


def test_reasons_and_messages_name_no_server_path(tmp_path):
    add_version(tmp_path, SEED)
    tampered = add_version(tmp_path, SEED + 1)
    (tampered / MODEL_FILE).write_bytes(encoder_onnx(seed=99))
    live = start_kserve_server(tmp_path)
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = kserve_stub(channel)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=WAIT)
            listed = embedding_pb2_grpc.EmbeddingServiceStub(channel).ListModels(
                embedding_pb2.ListModelsRequest(), timeout=WAIT
            )
            texts = [m.reason for m in index.models]
            texts += [v.reason for m in listed.models for v in m.versions]
            for request in (
                pb.ModelMetadataRequest(name=MODEL, version="2"),
                pb.RepositoryModelLoadRequest(model_name="absent"),
            ):
                call = (
                    stub.ModelMetadata
                    if isinstance(request, pb.ModelMetadataRequest)
                    else stub.RepositoryModelLoad
                )
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=WAIT, metadata=ADMIN)
                texts.append(caught.value.details())
    finally:
        live.stop()
    assert any(f"{MODEL}/2/{MODEL_FILE}: sha256 mismatch" in text for text in texts), texts
    assert not any(str(tmp_path) in text or str(tmp_path.parent) in text for text in texts)


# -- 8. our stubs and tritonclient in one process ---------------------------------------------

OURS = "import aet.proto.grpc_service_pb2, aet.server.kserve_service"
TRITON = "import tritonclient.grpc"


@pytest.mark.skipif(
    importlib.util.find_spec("tritonclient") is None, reason="tritonclient (test extra) missing"
)
@pytest.mark.parametrize("first, second", [(OURS, TRITON), (TRITON, OURS)])
def test_our_stubs_and_tritonclient_import_in_either_order(first, second):
    code = f"{first}\n{second}\nprint('both imported')"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "both imported" in result.stdout
