"""Hot reload under steady load: polling and the KServe load/unload RPCs, with no failed request.

Traffic threads keep asking for the latest version on both APIs and check every answer against
the weights of the version that gave it, while versions appear, fail their sha256 check,
disappear, and whole models are unloaded and loaded again.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kserve_harness import (
    ADMIN,
    MODEL,
    BatchGate,
    SteadyTraffic,
    add_version,
    digits_pixels,
    encoder_onnx,
    expected_embeddings,
    kserve_request,
    kserve_stub,
    start_kserve_server,
)

from aet.proto import grpc_service_pb2 as pb
from aet.repository import CARD_FILE, MODEL_FILE
from aet.server.auth import LIVENESS_SERVICE
from aet.server.models import ModelState

POLL_SECONDS = 0.2
SEEDS = {1: 21, 2: 22, 3: 23}


def wait_until(condition, timeout: float = 60.0) -> None:
    give_up = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < give_up, "condition not reached"
        time.sleep(0.02)


def states(live) -> dict[int, ModelState]:
    return {s.version: s.state for s in live.registry.statuses(MODEL)}


def tampered_version(staging: Path, version: int) -> Path:
    """A version folder numbered `version` whose model.onnx no longer matches its card, made
    outside the served repository so that the poller never sees its honest bytes."""
    for _ in range(version):
        folder = add_version(staging, SEEDS[1])
    (folder / MODEL_FILE).write_bytes(encoder_onnx(seed=99))
    return folder


def test_polling_follows_the_repository_under_load(tmp_path):
    repository = tmp_path / "repository"
    add_version(repository, SEEDS[1])
    live = start_kserve_server(repository, poll_seconds=POLL_SECONDS, max_batch_size=8)
    try:
        with (
            grpc.insecure_channel(live.target) as channel,
            SteadyTraffic(channel, seed_of_version=dict(SEEDS)) as traffic,
        ):
            traffic.wait_for_answers(version=1, count=20)

            # A new version serves once warmed up; "latest" moves to it.
            add_version(repository, SEEDS[2])
            traffic.wait_for_answers(version=2, count=20)

            # A version whose bytes do not match its card is refused; version 2 keeps serving.
            tampered_version(tmp_path / "staging", 3).rename(repository / MODEL / "3")
            wait_until(lambda: states(live).get(3) == ModelState.FAILED)
            assert "sha256 mismatch" in live.registry.statuses(MODEL)[2].reason
            traffic.wait_for_answers(version=2, count=20)

            # The latest version's folder goes: "latest" never steps back by itself, so
            # version 2 keeps serving (two full polls later) until a load says otherwise.
            shutil.rmtree(repository / MODEL / "2")
            polled = live.reloader.syncs
            wait_until(lambda: live.reloader.syncs >= polled + 2)
            assert states(live)[2] == ModelState.READY
            traffic.wait_for_answers(version=2, count=20)
            kserve_stub(channel).RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60, metadata=ADMIN
            )
            assert 2 not in states(live)
            traffic.wait_for_answers(version=1, count=20)
        assert traffic.failures == []
        assert traffic.answered_by[3] == 0
    finally:
        live.stop()


def test_index_reports_a_refused_version_with_its_reason(tmp_path):
    add_version(tmp_path, SEEDS[1])
    tampered = add_version(tmp_path, SEEDS[2])
    (tampered / MODEL_FILE).write_bytes(encoder_onnx(seed=99))
    live = start_kserve_server(tmp_path)
    try:
        with grpc.insecure_channel(live.target) as channel:
            index = kserve_stub(channel).RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
            reply = kserve_stub(channel).ModelInfer(kserve_request(digits_pixels(1)), timeout=30)
    finally:
        live.stop()
    assert [(m.version, m.state) for m in index.models] == [("1", "READY"), ("2", "UNAVAILABLE")]
    assert "sha256 mismatch" in index.models[1].reason
    assert reply.model_version == "1"


def test_unload_and_load_rpcs_under_load(tmp_path):
    add_version(tmp_path, SEEDS[1])
    live = start_kserve_server(
        tmp_path, poll_seconds=POLL_SECONDS, max_batch_size=1, max_request_rows=1000
    )
    gate = BatchGate(live.registry.lookup(MODEL))
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = kserve_stub(channel)
            # A long request in flight (1,000 runs of one row) must finish across the unload:
            # its first run is held until the unload has begun.
            in_flight = stub.ModelInfer.future(kserve_request(digits_pixels(1000)), timeout=60)
            gate.wait_entered()
            unloading = stub.RepositoryModelUnload.future(
                pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=60, metadata=ADMIN
            )
            wait_until(lambda: states(live).get(1) == ModelState.DRAINING)
            gate.open()
            unloading.result()
            assert len(in_flight.result().raw_output_contents[0]) == 1000 * 16  # 1000 x 4 FP32
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(kserve_request(digits_pixels(1)), timeout=30)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready

            # Polling leaves an explicitly unloaded model alone (two full polls later).
            polled = live.reloader.syncs
            wait_until(lambda: live.reloader.syncs >= polled + 2)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30)
            assert [(m.name, m.state, m.reason) for m in index.models] == [
                (MODEL, "UNAVAILABLE", "unloaded")
            ]

            stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60, metadata=ADMIN
            )
            assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=30).ready
            with SteadyTraffic(channel, seed_of_version=dict(SEEDS)) as traffic:
                traffic.wait_for_answers(version=1, count=10)
                # Loading again while serving is a no-op for versions already READY.
                stub.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60, metadata=ADMIN
                )
                traffic.wait_for_answers(version=1, count=10)
            assert traffic.failures == []
    finally:
        gate.open()
        live.stop()


@pytest.mark.parametrize(
    "request_, code, fragment",
    [
        (
            pb.RepositoryModelLoadRequest(model_name="absent"),
            grpc.StatusCode.NOT_FOUND,
            "model_name: expected a model of the repository (digits), got 'absent'",
        ),
        (
            pb.RepositoryModelLoadRequest(
                model_name=MODEL,
                parameters={"config": pb.ModelRepositoryParameter(string_param="{}")},
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "parameters['config']: expected none",
        ),
        (
            pb.RepositoryModelUnloadRequest(model_name="absent"),
            grpc.StatusCode.NOT_FOUND,
            "model_name: expected a loaded model (digits), got 'absent'",
        ),
    ],
)
def test_load_and_unload_refuse_what_they_cannot_do(tmp_path, request_, code, fragment):
    add_version(tmp_path, SEEDS[1])
    live = start_kserve_server(tmp_path)
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub = kserve_stub(channel)
            call = (
                stub.RepositoryModelLoad
                if isinstance(request_, pb.RepositoryModelLoadRequest)
                else stub.RepositoryModelUnload
            )
            with pytest.raises(grpc.RpcError) as caught:
                call(request_, timeout=30, metadata=ADMIN)
    finally:
        live.stop()
    assert caught.value.code() == code
    assert fragment in caught.value.details()


def test_load_of_a_model_with_no_loadable_version_is_unavailable(tmp_path):
    add_version(tmp_path, SEEDS[1])
    live = start_kserve_server(tmp_path)
    try:
        tampered = add_version(tmp_path, SEEDS[2], name="other")
        (tampered / MODEL_FILE).write_bytes(encoder_onnx(seed=99))
        with grpc.insecure_channel(live.target) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                kserve_stub(channel).RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name="other"), timeout=60, metadata=ADMIN
                )
    finally:
        live.stop()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "model 'other': no version could be loaded (version 1:" in caught.value.details()
    assert "sha256 mismatch" in caught.value.details()


def test_graceful_stop_finishes_work_in_flight(tmp_path):
    """What SIGTERM does in `aet serve`: stop taking calls, let accepted ones finish."""
    add_version(tmp_path, SEEDS[1])
    live = start_kserve_server(tmp_path, max_batch_size=1, max_request_rows=1000)
    gate = BatchGate(live.registry.lookup(MODEL))
    with grpc.insecure_channel(live.target) as channel:
        in_flight = kserve_stub(channel).ModelInfer.future(
            kserve_request(digits_pixels(1000)), timeout=60
        )
        gate.wait_entered()  # the request is running (held) when the stop begins
        stopping = threading.Thread(target=live.stop, kwargs={"grace_period": 30})
        stopping.start()
        wait_until(live.running.pipeline.draining.is_set)
        gate.open()
        stopping.join()
        assert len(in_flight.result().raw_output_contents[0]) == 1000 * 16


def test_drain_window_answers_what_arrives_while_readiness_fails(tmp_path):
    """SIGTERM with a drain window: readiness fails first (health, ServerReady) while every
    call sent before or during the window is answered; only then are new calls refused."""
    add_version(tmp_path, SEEDS[1])
    live = start_kserve_server(tmp_path, max_batch_size=1, drain_seconds=600)
    gate = BatchGate(live.registry.lookup(MODEL))
    finished: list[bool] = []
    try:
        with grpc.insecure_channel(live.target) as channel:
            stub, health = kserve_stub(channel), health_pb2_grpc.HealthStub(channel)

            def check(service: str) -> int:
                request = health_pb2.HealthCheckRequest(service=service)
                return health.Check(request, timeout=30).status

            sent = [stub.ModelInfer.future(kserve_request(digits_pixels(1)), timeout=60)]
            gate.wait_entered()  # held in its batch: in flight when the stop begins
            stopping = threading.Thread(target=lambda: finished.append(live.stop(30.0)))
            stopping.start()
            wait_until(lambda: check("") == health_pb2.HealthCheckResponse.NOT_SERVING)
            assert check(MODEL) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert check(LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=30).ready
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
            # A client that does not retry keeps sending during the window: all accepted.
            sent += [
                stub.ModelInfer.future(kserve_request(digits_pixels(1, seed=i)), timeout=60)
                for i in range(10)
            ]
            wait_until(lambda: live.registry.lookup(MODEL).batcher.queued_requests >= 10)
            live.running.end_drain.set()  # the window is over: new calls are refused
            wait_until(live.running.refusing.is_set)
            assert refused(stub)
            gate.open()
            answers = [future.result() for future in sent]
            stopping.join()
    finally:
        gate.open()
    assert [len(a.raw_output_contents[0]) for a in answers] == [16] * 11  # 4 FP32 each
    assert finished == [True]


def refused(stub) -> bool:
    """Whether a new ModelInfer is refused (the server stopped taking calls)."""
    try:
        stub.ModelInfer(kserve_request(digits_pixels(1)), timeout=30)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        return True
    return False


def answer(channel, pixels, version: str = "") -> tuple[int, np.ndarray]:
    """The version that answered a ModelInfer for `pixels`, and its embeddings."""
    reply = kserve_stub(channel).ModelInfer(
        kserve_request(pixels, model_version=version), timeout=30
    )
    data = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(len(pixels), -1)
    return int(reply.model_version), data


def replace_in_place(folder: Path, seed: int, staging: Path) -> None:
    """Swap `folder`'s model.onnx and model.json for those of another version of the same
    number (weights of `seed`), each by an atomic rename, as a careless deploy would."""
    other = add_version(staging, seed)
    for name in (MODEL_FILE, CARD_FILE):
        shutil.copy(other / name, folder / f".{name}.new")
        os.replace(folder / f".{name}.new", folder / name)


def test_a_served_version_whose_files_change_is_reloaded_or_failed(tmp_path, caplog):
    """FAULTS.md "Stale data": each sync checks a READY version's files (size, mtime, inode)."""
    repository = tmp_path / "repository"
    folder = add_version(repository, SEEDS[1])
    pixels = digits_pixels(3)
    live = start_kserve_server(repository)
    try:
        with grpc.insecure_channel(live.target) as channel:
            np.testing.assert_allclose(
                answer(channel, pixels)[1], expected_embeddings(pixels, SEEDS[1]), atol=1e-5
            )
            # Replaced in place by other weights with their own card: verified and reloaded.
            replace_in_place(folder, SEEDS[2], tmp_path / "other")
            live.reloader.sync()
            assert states(live)[1] == ModelState.READY
            np.testing.assert_allclose(
                answer(channel, pixels)[1], expected_embeddings(pixels, SEEDS[2]), atol=1e-5
            )
            assert "model_changed" in caplog.messages

            # Garbage over model.onnx: FAILED with its reason, the old weights no longer served.
            (folder / MODEL_FILE).write_bytes(b"garbage")
            live.reloader.sync()
            (status,) = live.registry.statuses(MODEL)
            assert status.state == ModelState.FAILED and "sha256 mismatch" in status.reason
            with pytest.raises(grpc.RpcError) as caught:
                answer(channel, pixels)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

            # Mended, then a wrong sha256 in model.json: READY again, then FAILED again.
            replace_in_place(folder, SEEDS[2], tmp_path / "again")
            live.reloader.sync()
            assert states(live)[1] == ModelState.READY
            card = json.loads((folder / CARD_FILE).read_text())
            (folder / CARD_FILE).write_text(json.dumps({**card, "sha256": "0" * 64}))
            live.reloader.sync()
            (status,) = live.registry.statuses(MODEL)
            assert status.state == ModelState.FAILED and "sha256 mismatch" in status.reason
    finally:
        live.stop()


def test_latest_never_steps_back_and_an_emptied_repository_keeps_serving(tmp_path, caplog):
    """FAULTS.md "Stale data": versions that vanish and return, an emptied repository, a
    failed latest version: "latest" goes back only on an explicit RepositoryModelLoad."""
    repository = tmp_path / "repository"
    add_version(repository, SEEDS[1])
    add_version(repository, SEEDS[2])
    pixels = digits_pixels(2)
    live = start_kserve_server(repository)
    try:
        with grpc.insecure_channel(live.target) as channel:
            assert answer(channel, pixels)[0] == 2
            # A move and restore of the latest version: it keeps serving throughout.
            (repository / MODEL / "2").rename(tmp_path / "moved")
            live.reloader.sync()
            assert answer(channel, pixels)[0] == 2
            assert "model_folder_missing" in caplog.messages
            (tmp_path / "moved").rename(repository / MODEL / "2")
            live.reloader.sync()
            assert answer(channel, pixels)[0] == 2

            # An emptied repository changes nothing and says so.
            (repository / MODEL).rename(tmp_path / "aside")
            live.reloader.sync()
            assert states(live) == {1: ModelState.READY, 2: ModelState.READY}
            assert "repository_poll_failed" in caplog.messages
            (tmp_path / "aside").rename(repository / MODEL)

            # The latest version fails: "latest" is UNAVAILABLE, not version 1 ...
            (repository / MODEL / "2" / MODEL_FILE).write_bytes(b"garbage")
            live.reloader.sync()
            with pytest.raises(grpc.RpcError) as caught:
                answer(channel, pixels)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "latest was version 2" in caught.value.details()
            assert answer(channel, pixels, version="1")[0] == 1
            # ... until a load says to serve what is there.
            kserve_stub(channel).RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60, metadata=ADMIN
            )
            assert answer(channel, pixels)[0] == 1
    finally:
        live.stop()
