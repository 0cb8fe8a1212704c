"""What the server counts, and the two views of it: Prometheus metrics and KServe statistics.

Every request is recorded once by the API that answered it (`observe_request`), every batch
once by the dynamic batcher that ran it (`VersionStatistics.observe_batch`). The same counts
feed the Prometheus exposition (scraped over HTTP on a configurable port) and the
`inference.GRPCInferenceService/ModelStatistics` RPC, so the two never disagree.

Prometheus series (all prefixed `aet_`):
- `requests_total{model,version,api,outcome}`: outcome is "success" or the failure's gRPC
  status in lower case ("invalid_argument", "not_found", "resource_exhausted", ...);
- `request_seconds{model,version,api}`: time in the server per request;
- `queue_seconds{model,version}`: time a request waited for its batch to start;
- `compute_seconds{model,version}`: time one batch took to run;
- `batch_size{model,version}`: rows per executed batch (shows batching at work);
- `queue_depth{model,version}`: requests waiting, read at scrape time;
- `model_state{model,version,aet_model_state}`: 1 for the version's current load state.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Enum, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MODEL_STATES = ("loading", "ready", "unloading", "unavailable")
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

    def add(self, seconds: float, times: int = 1) -> None:
        self.count += times
        self.ns += int(seconds * 1e9) * times


@dataclass
class StatisticsSnapshot:
    """A consistent copy of one model version's cumulative KServe statistics."""

    model: str
    version: str
    last_inference_ms: int = 0
    inference_count: int = 0  # rows inferred in successful batches
    execution_count: int = 0  # batches run
    success: Duration = field(default_factory=Duration)  # requests, time in the server
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)  # per request, time before its batch ran
    compute_infer: Duration = field(default_factory=Duration)  # per request, its batch's run
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> executions


class VersionStatistics:
    """The counters of one served model version; the batcher calls `observe_batch`."""

    def __init__(self, metrics: ServingMetrics, model: str, version: str):
        self._lock = threading.Lock()
        self._stats = StatisticsSnapshot(model, version)
        labels = {"model": model, "version": version}
        self._queue_seconds = metrics.queue_seconds.labels(**labels)
        self._compute_seconds = metrics.compute_seconds.labels(**labels)
        self._batch_size = metrics.batch_size.labels(**labels)

    def observe_batch(self, rows: int, queue_seconds: Sequence[float], compute_seconds: float,
                      ok: bool = True) -> None:
        """One executed batch: `rows` in total, one queue wait per request it merged."""
        self._batch_size.observe(rows)
        self._compute_seconds.observe(compute_seconds)
        for wait in queue_seconds:
            self._queue_seconds.observe(wait)
        with self._lock:
            stats = self._stats
            stats.execution_count += 1
            stats.batches.setdefault(rows, Duration()).add(compute_seconds)
            for wait in queue_seconds:
                stats.queue.add(wait)
            if ok:
                stats.inference_count += rows
                stats.compute_infer.add(compute_seconds, times=len(queue_seconds))
                stats.last_inference_ms = int(time.time() * 1000)

    def observe_outcome(self, ok: bool, seconds: float) -> None:
        """One request's end as KServe statistics count it (success or fail, time taken)."""
        with self._lock:
            (self._stats.success if ok else self._stats.fail).add(seconds)

    def snapshot(self) -> StatisticsSnapshot:
        """A copy that later requests do not change."""
        with self._lock:
            s = self._stats
            return StatisticsSnapshot(
                s.model, s.version, s.last_inference_ms, s.inference_count, s.execution_count,
                Duration(s.success.count, s.success.ns), Duration(s.fail.count, s.fail.ns),
                Duration(s.queue.count, s.queue.ns),
                Duration(s.compute_infer.count, s.compute_infer.ns),
                {size: Duration(d.count, d.ns) for size, d in s.batches.items()})


class _QueueDepthCollector(Collector):
    """Reads every registered queue's depth when Prometheus scrapes."""

    def __init__(self, depths: dict[tuple[str, str], Callable[[], int]], lock: threading.Lock):
        self._depths = depths
        self._lock = lock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("aet_queue_depth", "Requests waiting in the batcher queue",
                                   labels=["model", "version"])
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
        self.requests = Counter("aet_requests", "Requests answered, by outcome",
                                ["model", "version", "api", "outcome"], registry=r)
        self.request_seconds = Histogram("aet_request_seconds", "Time in the server per request",
                                         ["model", "version", "api"], buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.queue_seconds = Histogram("aet_queue_seconds", "Time a request waited for its batch",
                                       ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.compute_seconds = Histogram("aet_compute_seconds", "Time one batch took to run",
                                         ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("aet_batch_size", "Rows per executed batch",
                                    ["model", "version"],
                                    buckets=batch_size_buckets(max_batch_size), registry=r)
        self.model_state = Enum("aet_model_state", "Load state of each model version",
                                ["model", "version"], states=list(MODEL_STATES), registry=r)
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, str], VersionStatistics] = {}
        self._queue_depths: dict[tuple[str, str], Callable[[], int]] = {}
        r.register(_QueueDepthCollector(self._queue_depths, self._lock))

    def version(self, model: str, version: int | str) -> VersionStatistics:
        """The statistics of one model version, created on first use."""
        key = (model, str(version))
        with self._lock:
            if key not in self._versions:
                self._versions[key] = VersionStatistics(self, *key)
            return self._versions[key]

    def observe_request(self, model: str, version: int | str, api: str,
                        code: grpc.StatusCode, seconds: float) -> None:
        """One answered request. Use `UNKNOWN_MODEL` and version "" when none was resolved."""
        version = str(version)
        self.requests.labels(model, version, api, outcome_of(code)).inc()
        self.request_seconds.labels(model, version, api).observe(seconds)
        if model != UNKNOWN_MODEL and version:
            self.version(model, version).observe_outcome(code == grpc.StatusCode.OK, seconds)

    def set_model_state(self, model: str, version: int | str, state: str) -> None:
        """Record a version's load state, one of `MODEL_STATES`."""
        self.model_state.labels(model, str(version)).state(state)

    def watch_queue(self, model: str, version: int | str, depth: Callable[[], int]) -> None:
        """Report `depth()` as the version's queue depth at every scrape."""
        with self._lock:
            self._queue_depths[(model, str(version))] = depth

    def unwatch_queue(self, model: str, version: int | str) -> None:
        """Stop reporting a version's queue (it was unloaded)."""
        with self._lock:
            self._queue_depths.pop((model, str(version)), None)

    def snapshots(self, model: str | None = None,
                  version: str | None = None) -> list[StatisticsSnapshot]:
        """Statistics of every version seen, optionally of one model (and one version)."""
        with self._lock:
            chosen = [stats for (m, v), stats in sorted(self._versions.items())
                      if (model is None or m == model) and (version is None or v == version)]
        return [stats.snapshot() for stats in chosen]

    def serve_http(self, port: int, host: str = "127.0.0.1") -> MetricsEndpoint:
        """Serve `/metrics` over HTTP on `host:port` (0: any free port) in a daemon thread."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsEndpoint(server, thread)


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
