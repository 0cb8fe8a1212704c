"""Hot reload under steady load: polling and the KServe load/unload RPCs, with no failed request.

Traffic threads keep asking for the latest version on both APIs and check every answer against
the weights of the version that gave it, while versions appear, fail their sha256 check,
disappear, and whole models are unloaded and loaded again.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
from kserve_harness import (
    MODEL,
    BatchGate,
    SteadyTraffic,
    add_version,
    digits_pixels,
    encoder_onnx,
    kserve_request,
    kserve_stub,
    start_kserve_server,
)

from aet.proto import grpc_service_pb2 as pb
from aet.repository import MODEL_FILE
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

            # The latest version's folder goes: it drains, version 1 takes over.
            shutil.rmtree(repository / MODEL / "2")
            wait_until(lambda: 2 not in states(live))
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
                pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=60
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

            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60)
            assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=30).ready
            with SteadyTraffic(channel, seed_of_version=dict(SEEDS)) as traffic:
                traffic.wait_for_answers(version=1, count=10)
                # Loading again while serving is a no-op for versions already READY.
                stub.RepositoryModelLoad(
                    pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=60
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
                call(request_, timeout=30)
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
                    pb.RepositoryModelLoadRequest(model_name="other"), timeout=60
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
        wait_until(live.running.stopping.is_set)
        gate.open()
        stopping.join()
        assert len(in_flight.result().raw_output_contents[0]) == 1000 * 16
