"""`EmbeddingClient` against real servers on 127.0.0.1: chunking under a small message limit,
gRPC's retries (service config) on a real RESOURCE_EXHAUSTED from a tiny queue, none on
INVALID_ARGUMENT or a passed deadline, streams, options, model information, replicas given as
a list, bearer tokens and mutual TLS. A server interceptor counts the attempts that arrive.

The served model is the harness's tiny real ONNX encoder, whose exact output `expected_embeddings`
computes in numpy, so every answer is checked number by number."""

from __future__ import annotations

import collections
import json
import threading

import grpc
import numpy as np
import pytest
from kserve_harness import (
    EMBEDDING_DIM,
    MODEL,
    RAW_MAX,
    add_version,
    digits_pixels,
    expected_embeddings,
)

from aet.clients.client import EmbeddingClient, EmbeddingError, RetryPolicy, channel_target
from aet.errors import UserError
from aet.server.auth import BearerTokenInterceptor

SEED = 0
MIB = 1 << 20


class CallCounter(grpc.ServerInterceptor):
    """Counts the calls (attempts, retries included) that reach the server, by method."""

    def __init__(self):
        self.calls: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def intercept_service(self, continuation, handler_call_details):
        with self._lock:
            self.calls[handler_call_details.method.rsplit("/", 1)[-1]] += 1
        return continuation(handler_call_details)

    def __getitem__(self, method: str) -> int:
        with self._lock:
            return self.calls[method]

    def clear(self) -> None:
        with self._lock:
            self.calls.clear()


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    root = tmp_path_factory.mktemp("repository")
    add_version(root, seed=SEED)
    return root


@pytest.fixture
def calls():
    return CallCounter()


@pytest.fixture
def small_message_server(repository, start_server, calls):
    """A server that takes messages of at most 1 MiB (4,096 float32 rows of 8x8 pixels)."""
    return start_server(repository, max_message_mb=1, interceptors=[calls])


@pytest.fixture
def tiny_queue_server(repository, start_server, calls):
    """One row per run and one waiting request: concurrent large requests overflow the queue."""
    return start_server(
        repository,
        max_batch_size=1,
        max_queue_size=1,
        max_queue_delay_ms=0.0,
        interceptors=[calls],
    )


def target(server) -> str:
    return f"127.0.0.1:{server.port}"


def test_long_input_is_split_under_the_message_limit_and_streamed(small_message_server, calls):
    pixels = digits_pixels(10_000, seed=1)  # 2.4 MiB of float32
    with EmbeddingClient(target(small_message_server), max_message_bytes=MIB) as client:
        rows = client.rows_per_request(pixels, MODEL)
        embeddings = client.embed(pixels, MODEL)
    assert rows * pixels[0].nbytes <= MIB and -(-len(pixels) // rows) >= 3
    assert embeddings.shape == (10_000, EMBEDDING_DIM) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, expected_embeddings(pixels, SEED), rtol=1e-5, atol=1e-5)
    assert calls["EmbedStream"] == 1 and calls["Embed"] == 0


def test_message_over_the_server_limit_is_refused(small_message_server):
    pixels = digits_pixels(8_000, seed=2)  # 2 MiB in one request: the server refuses it
    with EmbeddingClient(target(small_message_server), max_message_bytes=4 * MIB) as client:
        with pytest.raises(EmbeddingError) as caught:
            client.embed(pixels, MODEL)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in caught.value.details


def test_stream_of_batches_answers_each_batch_in_order(small_message_server):
    sizes = [1, 4_500, 7, 300]  # the 4,500-row batch needs two requests under 1 MiB
    batches = [digits_pixels(n, seed=10 + i) for i, n in enumerate(sizes)]
    with EmbeddingClient(target(small_message_server), max_message_bytes=MIB) as client:
        answers = list(client.embed_batches(iter(batches), MODEL))
    assert [len(a) for a in answers] == sizes
    for batch, answer in zip(batches, answers, strict=True):
        np.testing.assert_allclose(answer, expected_embeddings(batch, SEED), rtol=1e-5, atol=1e-5)


def test_uint8_input_and_output_options(small_message_server):
    pixels = np.random.default_rng(3).integers(0, int(RAW_MAX) + 1, (50, 1, 8, 8), dtype=np.uint8)
    with EmbeddingClient(target(small_message_server)) as client:
        plain = client.embed(pixels, MODEL)
        normalised = client.embed(pixels, MODEL, l2_normalize=True)
        half = client.embed(pixels, MODEL, version=1, float16=True)
    np.testing.assert_allclose(
        plain, expected_embeddings(pixels.astype(np.float32), SEED), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, rtol=1e-5)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, plain, rtol=2e-3, atol=2e-3)


def _embed_concurrently(
    target: str, retry: RetryPolicy, pixels: np.ndarray, callers: int
) -> tuple[list[np.ndarray], list[EmbeddingError]]:
    """`callers` threads send `pixels` at once through one client each."""
    results, errors = [], []
    start = threading.Barrier(callers)

    def call() -> None:
        with EmbeddingClient(target, retry=retry) as client:
            client.describe(MODEL)  # connect and learn the limits before the race
            start.wait()
            try:
                results.append(client.embed(pixels, MODEL))
            except EmbeddingError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def test_queue_full_is_real_and_retried_by_the_service_config(tiny_queue_server, calls):
    pixels = digits_pixels(1_000, seed=4)  # 1,000 one-row runs keep the model busy
    _, errors = _embed_concurrently(
        target(tiny_queue_server), RetryPolicy(max_attempts=1), pixels, callers=4
    )
    assert errors and {e.code for e in errors} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert calls["Embed"] == 4  # one attempt each: no retry

    calls.clear()
    results, errors = _embed_concurrently(
        target(tiny_queue_server),
        RetryPolicy(max_attempts=5, initial_backoff=0.5, max_backoff=2.0),
        pixels,
        callers=3,
    )
    assert not errors and len(results) == 3
    for embeddings in results:
        np.testing.assert_allclose(
            embeddings, expected_embeddings(pixels, SEED), rtol=1e-5, atol=1e-5
        )
    assert calls["Embed"] > 3  # refused attempts came back and were answered


def test_deadline_is_sent_and_not_retried(tiny_queue_server, calls):
    pixels = digits_pixels(5_000, seed=5)  # 5,000 one-row runs: far longer than 5 ms
    with EmbeddingClient(target(tiny_queue_server)) as client:
        client.describe(MODEL)  # connected, limits known: only the embedding call is timed
        with pytest.raises(EmbeddingError) as caught:
            client.embed(pixels, MODEL, timeout=0.005)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert calls["Embed"] <= 1


def test_service_config_balances_and_retries_within_the_deadline():
    config = json.loads(RetryPolicy(max_attempts=3, initial_backoff=0.1).service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": "aet.v1.EmbeddingService"}]
    assert method["retryPolicy"]["maxAttempts"] == 3
    assert method["retryPolicy"]["initialBackoff"] == "0.1s"
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert (
        "retryPolicy"
        not in json.loads(RetryPolicy(max_attempts=1).service_config())["methodConfig"][0]
    )
    with pytest.raises(ValueError, match=r"max_attempts: expected 1\.\.5 \(gRPC's cap\), got 6"):
        RetryPolicy(max_attempts=6)


def test_replica_addresses_become_one_balanced_target():
    assert channel_target("127.0.0.1:1") == "127.0.0.1:1"
    assert channel_target("dns:///embed.example:8500") == "dns:///embed.example:8500"
    assert channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(UserError, match=r"ip:port literals, got 'replica-b:2'"):
        channel_target(["127.0.0.1:1", "replica-b:2"])
    with pytest.raises(UserError, match="one IP family"):
        channel_target(["127.0.0.1:1", "[::1]:2"])


def test_list_of_replicas_spreads_calls_over_both(repository, start_server):
    counters = [CallCounter(), CallCounter()]
    servers = [start_server(repository, interceptors=[c]) for c in counters]
    pixels = digits_pixels(8)
    with EmbeddingClient([target(s) for s in servers]) as client:
        client.describe(MODEL)
        for _ in range(20):
            np.testing.assert_allclose(
                client.embed(pixels, MODEL), expected_embeddings(pixels, SEED), atol=1e-5
            )
    assert all(c["Embed"] > 0 for c in counters)
    assert sum(c["Embed"] for c in counters) == 20


def test_invalid_argument_is_raised_at_once_with_the_server_message(small_message_server, calls):
    wrong_shape = np.zeros((3, 1, 7, 7), np.float32)
    with EmbeddingClient(target(small_message_server)) as client:
        with pytest.raises(EmbeddingError) as caught:
            client.embed(wrong_shape, MODEL)
        with pytest.raises(EmbeddingError) as missing:
            client.embed(digits_pixels(2), "no-such-model")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.method == "Embed" and "7" in caught.value.details
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in str(missing.value)
    assert calls["Embed"] == 1 and calls["DescribeModel"] == 2  # one attempt each


def test_bad_row_in_a_stream_ends_it_with_invalid_argument(small_message_server, calls):
    batches = [digits_pixels(5), np.full((2, 1, 8, 8), np.nan, np.float32)]
    with EmbeddingClient(target(small_message_server)) as client:
        answers = client.embed_batches(iter(batches), MODEL)
        assert len(next(answers)) == 5
        with pytest.raises(EmbeddingError) as caught:
            next(answers)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.method == "EmbedStream" and "request_id '1'" in caught.value.details
    assert calls["EmbedStream"] == 1


def test_inputs_are_checked_before_sending(small_message_server):
    with EmbeddingClient(target(small_message_server)) as client:
        with pytest.raises(TypeError, match=r"dtype float64: expected values that float32 holds"):
            client.embed(np.full((2, 1, 8, 8), 0.1), MODEL)
        with pytest.raises(TypeError, match="expected uint8, float32 or another real dtype"):
            client.embed(np.zeros((2, 1, 8, 8), np.complex64), MODEL)
        with pytest.raises(ValueError, match=r"got \(0, 1, 8, 8\)"):
            client.embed(np.zeros((0, 1, 8, 8), np.float32), MODEL)


def test_list_models_and_describe(small_message_server):
    with EmbeddingClient(target(small_message_server)) as client:
        models = client.list_models()
        description = client.describe(MODEL)
    assert [(m.name, m.latest_version) for m in models] == [(MODEL, 1)]
    assert description.embedding_dim == EMBEDDING_DIM
    assert list(description.input.shape) == [1, 8, 8]
    assert description.input.max_value == RAW_MAX


def test_bearer_token(repository, start_server):
    server = start_server(repository, interceptors=[BearerTokenInterceptor(["s3cret-token"])])
    with EmbeddingClient(target(server)) as anonymous:
        with pytest.raises(EmbeddingError) as caught:
            anonymous.list_models()
    with EmbeddingClient(target(server), token="s3cret-token") as client:
        embeddings = client.embed(digits_pixels(3), MODEL)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert embeddings.shape == (3, EMBEDDING_DIM)


def test_mutual_tls(repository, start_server, pki):
    server = start_server(
        repository,
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    with EmbeddingClient(
        target(server),
        root_cert=pki / "ca.pem",
        client_cert=pki / "client.pem",
        client_key=pki / "client.key",
    ) as client:
        pixels = digits_pixels(4)
        embeddings = client.embed(pixels, MODEL)
    with EmbeddingClient(
        target(server), root_cert=pki / "ca.pem", retry=RetryPolicy(max_attempts=1)
    ) as no_client_cert:
        with pytest.raises(EmbeddingError) as caught:
            no_client_cert.list_models()
    np.testing.assert_allclose(embeddings, expected_embeddings(pixels, SEED), rtol=1e-5, atol=1e-5)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
