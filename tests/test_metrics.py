"""Prometheus metrics scraped over HTTP from a real server, checked against the traffic sent."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from kserve_harness import (
    MODEL,
    BatchGate,
    add_version,
    digits_pixels,
    kserve_request,
    kserve_stub,
    start_kserve_server,
)
from prometheus_client.parser import text_string_to_metric_families

from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto.codec import encode_tensor
from aet.server.metrics import MODEL_STATES, batch_size_buckets, outcome_of


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """Every sample of the exposition, keyed by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples, name: str, **labels) -> float:
    return samples[(name, frozenset(labels.items()))]


def test_batch_size_buckets_are_powers_of_two_up_to_the_limit():
    assert batch_size_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_size_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)
    assert batch_size_buckets(1) == (1,)


def test_outcome_labels():
    assert outcome_of(grpc.StatusCode.OK) == "success"
    assert outcome_of(grpc.StatusCode.RESOURCE_EXHAUSTED) == "resource_exhausted"
    assert MODEL_STATES == ("loading", "ready", "draining", "failed")


@pytest.fixture
def live(tmp_path):
    add_version(tmp_path, seed=1)
    server = start_kserve_server(tmp_path, max_batch_size=8)
    yield server
    server.stop()


def test_requests_batches_latencies_and_state_match_the_traffic(live):
    row_counts = [1, 3, 8, 5]
    with grpc.insecure_channel(live.target) as channel:
        stub = kserve_stub(channel)
        for i, rows in enumerate(row_counts):
            stub.ModelInfer(kserve_request(digits_pixels(rows, seed=i)), timeout=30)
        embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
            embedding_pb2.EmbedRequest(model=MODEL, inputs=encode_tensor(digits_pixels(2))),
            timeout=30,
        )
        for bad in (
            kserve_request(digits_pixels(0)),
            kserve_request(digits_pixels(1), model_name="absent"),
        ):
            with pytest.raises(grpc.RpcError):
                stub.ModelInfer(bad, timeout=30)
    samples = scrape(live.metrics_endpoint.port)
    version = {"model": MODEL, "version": "1"}
    kserve = {**version, "api": "kserve"}
    assert sample(samples, "aet_requests_total", **kserve, outcome="success") == 4
    assert sample(samples, "aet_requests_total", **kserve, outcome="invalid_argument") == 1
    assert (
        sample(
            samples, "aet_requests_total", model="", version="", api="kserve", outcome="not_found"
        )
        == 1
    )
    assert sample(samples, "aet_request_seconds_count", **kserve) == 5
    # Batches and queue waits come from the batcher: both APIs' requests are in them.
    assert sample(samples, "aet_batch_size_count", **version) == 5
    assert sample(samples, "aet_batch_size_sum", **version) == sum(row_counts) + 2
    assert sample(samples, "aet_batch_size_bucket", **version, le="4.0") == 3  # 1, 3 and 2 rows
    assert sample(samples, "aet_queue_seconds_count", **version) == 5
    assert sample(samples, "aet_compute_seconds_count", **version) == 5
    assert sample(samples, "aet_queue_depth", **version) == 0
    assert sample(samples, "aet_model_state", **version, aet_model_state="ready") == 1
    assert sample(samples, "aet_model_state", **version, aet_model_state="loading") == 0


def test_queue_depth_is_read_at_scrape_time(tmp_path):
    """With one row per run, a 1,000-row request sits in the queue for its 1,000 runs."""
    add_version(tmp_path, seed=1)
    live = start_kserve_server(tmp_path, max_batch_size=1, max_request_rows=1000)
    try:
        gate = BatchGate(live.registry.lookup(MODEL))
        with grpc.insecure_channel(live.target) as channel:
            future = kserve_stub(channel).ModelInfer.future(
                kserve_request(digits_pixels(1000)), timeout=60
            )
            gate.wait_entered()  # held after its first run: the rest of it stays queued
            depth_while_busy = sample(
                scrape(live.metrics_endpoint.port), "aet_queue_depth", model=MODEL, version="1"
            )
            still_running = not future.done()
            gate.open()
            future.result()
        assert (depth_while_busy, still_running) == (1, True)
        assert (
            sample(scrape(live.metrics_endpoint.port), "aet_queue_depth", model=MODEL, version="1")
            == 0
        )
    finally:
        live.stop()


def test_unloaded_version_leaves_the_state_and_queue_series(live):
    live.reloader.unload_model(MODEL)
    samples = scrape(live.metrics_endpoint.port)
    assert not any(name in ("aet_model_state", "aet_queue_depth") for name, _ in samples)
