"""An extraction job across two real `aet serve` replicas on 127.0.0.1, one of them killed
mid-job with a request in its hands: the client's round_robin policy spread the requests over
both (their Prometheus metrics say so), gRPC's retry policy sends the request the dead replica
failed to the live one, and the output holds every row exactly once, with the local backend's
embeddings.

The kill is gated on observable conditions, not on time: the job pauses once both replicas'
metrics count answered requests, and the test waits until the requests already sent are
answered (one that a replica has read when it is frozen would hold the job, which takes results
in order, until its deadline); it freezes one replica (SIGSTOP), lets the job go on until a
request sits unread in that replica's socket (/proc/net/tcp), then kills it."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import DIGITS_MODEL

from aet.clients.backends import LocalBackend, ServerBackend
from aet.clients.client import EmbeddingClient
from aet.clients.embeddings import read_embeddings
from aet.clients.extract import EmbedConfig, extract
from aet.clients.server_process import ServerProcess, free_port
from aet.training.dataspec import DataSpec

ROWS = 400
WAIT_SECONDS = 300.0  # generous bounds on conditions that must hold; never a pass condition


def answered_requests(metrics_port: int) -> int:
    """Embed requests the replica answered successfully, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
        text = page.read().decode()
    return int(
        sum(
            float(value)
            for labels, value in re.findall(r"^aet_requests_total\{([^}]*)\} (\S+)$", text, re.M)
            if 'api="embed"' in labels and 'outcome="success"' in labels
        )
    )


def unread_request_bytes(port: int) -> int:
    """Bytes received on connections to local `port` that the server has not read yet."""
    unread = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC listens on v4-mapped IPv6
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if local.endswith(f":{port:04X}") and state == "01":  # ESTABLISHED, server side
                unread += int(queues.split(":")[1], 16)
    return unread


def wait_for(condition, what: str) -> None:
    """Poll `condition` until it holds; fail after WAIT_SECONDS naming `what`."""
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what}"
        time.sleep(0.05)


class RecordingPool(ThreadPoolExecutor):
    """A thread pool that keeps the future of every task submitted to it."""

    def __init__(self, workers: int):
        super().__init__(workers, thread_name_prefix="aet-embed")
        self.futures: list[Future] = []

    def submit(self, fn, /, *args, **kwargs):
        future = super().submit(fn, *args, **kwargs)
        self.futures.append(future)
        return future


class PausingBackend(ServerBackend):
    """The real server backend; pauses the job once every replica has answered a request,
    until `resume` is set. Its requests go through a `RecordingPool` (`unanswered`)."""

    def __init__(self, client, metrics_ports: list[int]):
        super().__init__(client, DIGITS_MODEL)
        self._pool.shutdown()
        self._pool = RecordingPool(self._in_flight)
        self.metrics_ports = metrics_ports
        self.paused = threading.Event()
        self.resume = threading.Event()

    def unanswered(self) -> int:
        """Requests sent and not yet answered (or failed)."""
        return sum(not future.done() for future in self._pool.futures)

    def embed_rows(self, pixels, batch_size):
        for embeddings in super().embed_rows(pixels, batch_size):
            yield embeddings
            if not self.paused.is_set() and all(map(answered_requests, self.metrics_ports)):
                self.paused.set()
                assert self.resume.wait(WAIT_SECONDS)


@pytest.fixture
def replicas(tmp_path, model_repository):
    ports = [free_port(), free_port()]
    servers = [
        ServerProcess(model_repository, tmp_path / f"replica-{i}.log", f"--metrics-port={port}")
        for i, port in enumerate(ports)
    ]
    try:
        for server in servers:
            server.wait_until_serving(DIGITS_MODEL)
        yield servers, ports
    finally:
        for server in servers:
            server.stop()


def test_job_across_two_replicas_survives_losing_one(tmp_path, replicas, model_repository):
    servers, metrics_ports = replicas
    job = EmbedConfig(
        server=",".join(server.target for server in servers),
        model=DIGITS_MODEL,
        data=DataSpec(limit=ROWS),
        batch_size=8,  # 50 requests: many per replica before and after the kill
        shard_size=64,
        output=tmp_path / "replicated.npz",
        progress=False,
    )
    client = EmbeddingClient(job.server)
    assert client.target.startswith("ipv4:")
    outcome: dict = {}
    with PausingBackend(client, metrics_ports) as backend:

        def run() -> None:
            try:
                outcome["summary"] = extract(job, backend)
            except BaseException as exc:  # reported by the test thread below
                outcome["error"] = exc
            finally:
                backend.paused.set()  # never leave the test waiting on a job that ended

        worker = threading.Thread(target=run)
        worker.start()
        assert backend.paused.wait(WAIT_SECONDS)
        assert "summary" not in outcome and "error" not in outcome, "job ended before the kill"
        wait_for(lambda: backend.unanswered() == 0, "the paused job's requests")
        before = [answered_requests(port) for port in metrics_ports]
        assert all(count > 0 for count in before)  # both replicas served traffic

        frozen = servers[1]
        os.kill(frozen.process.pid, signal.SIGSTOP)
        backend.resume.set()
        wait_for(lambda: unread_request_bytes(frozen.port) > 0, "a request to the frozen replica")
        frozen.process.kill()  # with that request unanswered: gRPC retries it on the other
        frozen.process.wait()
        worker.join(WAIT_SECONDS)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"].embedded_rows == ROWS
    assert answered_requests(metrics_ports[0]) > before[0]  # the live replica took over

    table = read_embeddings(job.output)
    np.testing.assert_array_equal(table.ids, np.arange(ROWS))  # every row exactly once
    local = tmp_path / "local.npz"
    model_dir = model_repository / DIGITS_MODEL
    with LocalBackend(model_dir) as reference_backend:
        extract(
            EmbedConfig(local=model_dir, data=DataSpec(limit=ROWS), output=local, progress=False),
            reference_backend,
        )
    reference = read_embeddings(local)
    np.testing.assert_allclose(table.embeddings, reference.embeddings, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(table.split, reference.split)
