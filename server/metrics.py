"""What the server counts, and the two views of it: Prometheus metrics and KServe statistics.

Two sources feed both views. Each dynamic batcher reports every batch it ran (rows, run time,
the queue wait of each request in it), whichever API the requests came from. Each API reports
every request it answered (`ServingMetrics.observe_request`: outcome, time in the server and,
on success, where that time went). The Prometheus exposition is scraped over HTTP on a
configurable port (open, or behind the server's bearer tokens with `aet serve --metrics-token`);
the `inference.GRPCInferenceService/ModelStatistics` RPC reads the same counters, so the two
never disagree.

Prometheus series (all prefixed `aet_`):
- `requests_total{model,version,api,outcome}`: outcome is "success" or the failure's gRPC
  status in lower case ("invalid_argument", "not_found", "resource_exhausted", ...);
- `request_seconds{model,version,api}`: time in the server per request;
- `queue_seconds{model,version}`: time a request waited for its batch to start;
- `compute_seconds{model,version}`: time one batch took to run;
- `batch_size{model,version}`: rows per executed batch (shows batching at work);
- `queue_depth{model,version}`: requests waiting, read at scrape time;
- `model_state{model,version,aet_model_state}`: 1 for the version's current load state
  (loading, ready, draining, failed).
"""

from __future__ import annotations

import copy
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Enum, Histogram, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from aet.errors import UserError
from aet.server.auth import TokenCheck
from aet.server.batcher import BatchRecord
from aet.server.models import LoadedModel, ModelRegistry, ModelState, VersionStatus

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
MODEL_STATES = tuple(s.value.lower() for s in ModelState if s != ModelState.UNLOADED)
SUCCESS = "success"
UNKNOWN_MODEL = ""  # the model label of requests naming no servable model: bounds cardinality


def outcome_of(code: grpc.StatusCode) -> str:
    """The `outcome` label for a request that ended with `code`."""
    return SUCCESS if code == grpc.StatusCode.OK else code.name.lower()


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """Powers of two up to `max_batch_size`, and `max_batch_size` itself."""
    buckets = []
    size = 1
    while size < max_batch_size:
        buckets.append(float(size))
        size *= 2
    buckets.append(float(max_batch_size))
    return tuple(buckets)


@dataclass
class Duration:
    """A count of events and their total duration in nanoseconds (KServe's StatisticDuration)."""

    count: int = 0
    ns: int = 0

    def add(self, count: int, seconds: float) -> None:
        """Count `count` more events that took `seconds` together."""
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass(frozen=True)
class RequestTiming:
    """Where a successful request's time went, in seconds."""

    decode: float  # request message to a checked array
    queue: float  # waiting for its batch to start
    run: float  # the onnxruntime runs that held its rows
    encode: float  # embeddings to the response message


@dataclass
class StatisticsSnapshot:
    """One model version's cumulative KServe statistics (names follow `ModelStatistics`).

    Per-request durations count successful requests; compute_input is decoding, compute_infer
    the batch run (each request is charged its whole batch, as Triton does), compute_output
    encoding. Per-batch figures count every batch, whichever API its requests came from.
    """

    model: str
    version: str
    last_inference_ms: int = 0  # epoch milliseconds of the last successful request
    inference_count: int = 0  # rows run
    execution_count: int = 0  # batches run
    success: Duration = field(default_factory=Duration)  # requests, time in the server
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, Duration] = field(default_factory=dict)  # batch rows -> runs


class VersionStatistics:
    """The counters of one served model version."""

    def __init__(self, metrics: ServingMetrics, model: str, version: str):
        self._lock = threading.Lock()
        self._stats = StatisticsSnapshot(model, version)
        labels = {"model": model, "version": version}
        self._queue_seconds = metrics.queue_seconds.labels(**labels)
        self._compute_seconds = metrics.compute_seconds.labels(**labels)
        self._batch_size = metrics.batch_size.labels(**labels)

    def observe_batch(self, record: BatchRecord) -> None:
        """One batch the version's `DynamicBatcher` ran."""
        self._batch_size.observe(record.rows)
        self._compute_seconds.observe(record.run_seconds)
        for wait in record.queue_seconds:
            self._queue_seconds.observe(wait)
        with self._lock:
            self._stats.execution_count += 1
            self._stats.inference_count += record.rows
            self._stats.batches.setdefault(record.rows, Duration()).add(1, record.run_seconds)

    def observe_request(self, seconds: float, timing: RequestTiming | None) -> None:
        """One answered request: successful with its `timing`, or failed (`timing` None)."""
        with self._lock:
            stats = self._stats
            if timing is None:
                stats.fail.add(1, seconds)
                return
            stats.success.add(1, seconds)
            stats.queue.add(1, timing.queue)
            stats.compute_input.add(1, timing.decode)
            stats.compute_infer.add(1, timing.run)
            stats.compute_output.add(1, timing.encode)
            stats.last_inference_ms = int(time.time() * 1000)

    def snapshot(self) -> StatisticsSnapshot:
        """A copy that later requests do not change."""
        with self._lock:
            return copy.deepcopy(self._stats)


class _QueueDepthCollector(Collector):
    """Reads every registered queue's depth when Prometheus scrapes."""

    def __init__(self, depths: dict[tuple[str, str], Callable[[], int]], lock: threading.Lock):
        self._depths = depths
        self._lock = lock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "aet_queue_depth", "Requests waiting in the batcher queue", labels=["model", "version"]
        )
        with self._lock:
            readers = list(self._depths.items())
        for (model, version), depth in readers:
            family.add_metric([model, version], depth())
        yield family


class ServingMetrics:
    """All counters of one server, in their own Prometheus registry (so servers don't clash)."""

    def __init__(self, max_batch_size: int, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aet_requests",
            "Requests answered, by outcome",
            ["model", "version", "api", "outcome"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "aet_request_seconds",
            "Time in the server per request",
            ["model", "version", "api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "aet_queue_seconds",
            "Time a request waited for its batch",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "aet_compute_seconds",
            "Time one batch took to run",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "aet_batch_size",
            "Rows per executed batch",
            ["model", "version"],
            buckets=batch_size_buckets(max_batch_size),
            registry=r,
        )
        self.model_state = Enum(
            "aet_model_state",
            "Load state of each model version",
            ["model", "version"],
            states=list(MODEL_STATES),
            registry=r,
        )
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, str], VersionStatistics] = {}
        self._request_series: dict[tuple, tuple[Counter, Histogram]] = {}
        self._queue_depths: dict[tuple[str, str], Callable[[], int]] = {}
        r.register(_QueueDepthCollector(self._queue_depths, self._lock))

    def version(self, model: str, version: int | str) -> VersionStatistics:
        """The statistics of one model version, created on first use."""
        key = (model, str(version))
        found = self._versions.get(key)  # the hot path: no lock once created
        if found is None:
            with self._lock:
                found = self._versions.get(key) or VersionStatistics(self, *key)
                self._versions[key] = found
        return found

    def observe_request(
        self,
        model: str,
        version: int | str,
        api: str,
        code: grpc.StatusCode,
        seconds: float,
        timing: RequestTiming | None = None,
    ) -> None:
        """One answered request; `timing` for successful ones. Use `UNKNOWN_MODEL` and
        version "" when the request named no servable model or version."""
        version = str(version)
        key = (model, version, api, code)
        series = self._request_series.get(key)
        if series is None:  # labels() takes a lock and builds a key: do it once per series
            series = (
                self.requests.labels(model, version, api, outcome_of(code)),
                self.request_seconds.labels(model, version, api),
            )
            self._request_series[key] = series
        series[0].inc()
        series[1].observe(seconds)
        if model != UNKNOWN_MODEL and version:
            self.version(model, version).observe_request(
                seconds, timing if code == grpc.StatusCode.OK else None
            )

    def watch_registry(self, registry: ModelRegistry) -> None:
        """Follow `registry` from now on: every batch, load state and queue of every version."""
        registry.add_batch_listener(self._observe_batch)
        registry.add_state_listener(lambda status: self._observe_state(registry, status))
        for status in registry.statuses():
            self._observe_state(registry, status)

    def _observe_batch(self, model: LoadedModel, record: BatchRecord) -> None:
        self.version(model.name, model.version).observe_batch(record)

    def _observe_state(self, registry: ModelRegistry, status: VersionStatus) -> None:
        key = (status.name, str(status.version))
        with self._lock:
            self._queue_depths.pop(key, None)
        if status.state == ModelState.UNLOADED:
            self.model_state.remove(*key)
            return
        self.model_state.labels(*key).state(status.state.value.lower())
        if status.state == ModelState.READY:
            batcher = registry.lookup(status.name, status.version).batcher
            with self._lock:
                self._queue_depths[key] = lambda: batcher.queued_requests

    def snapshots(
        self, model: str | None = None, version: str | None = None
    ) -> list[StatisticsSnapshot]:
        """Statistics of every version seen, optionally of one model (and one version)."""
        with self._lock:
            chosen = [
                stats
                for (m, v), stats in sorted(self._versions.items())
                if (model is None or m == model) and (version is None or v == version)
            ]
        return [stats.snapshot() for stats in chosen]

    def serve_http(
        self, port: int, host: str = "127.0.0.1", token_check: TokenCheck | None = None
    ) -> MetricsEndpoint:
        """Serve `/metrics` over HTTP on `host:port` (0: any free port) in a daemon thread.

        With `token_check`, a scrape without an accepted `Authorization: Bearer <token>`
        header gets 401. Raises `UserError` naming the address when it cannot be bound.
        """
        app = make_wsgi_app(self.registry)
        if token_check is not None:
            app = _require_token(app, token_check)
        try:

            class Server(ThreadingWSGIServer):
                address_family = socket.getaddrinfo(host, port)[0][0]  # IPv4 or IPv6 host

            server = make_server(host, port, app, Server, _QuietHandler)
        except OSError as exc:
            raise UserError(
                f"metrics_port: cannot bind {host}:{port}: {exc.strerror or exc}"
            ) from exc
        thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
        thread.start()
        return MetricsEndpoint(server, thread)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # scrapes are not log events
        pass


def _require_token(app: Callable, check: TokenCheck) -> Callable:
    """A WSGI app that answers 401 unless the request carries an accepted bearer token."""

    def guarded(environ, start_response):
        refusal = check.refusal(environ.get("HTTP_AUTHORIZATION"))
        if refusal is None:
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("Content-Type", "text/plain; charset=utf-8"), ("WWW-Authenticate", "Bearer")],
        )
        return [refusal.encode("utf-8")]

    return guarded


class MetricsEndpoint:
    """A running Prometheus HTTP endpoint; `close()` stops it."""

    def __init__(self, server, thread: threading.Thread):
        self._server = server
        self._thread = thread

    @property
    def port(self) -> int:
        return self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
