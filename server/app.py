"""`aet serve`: the gRPC server over a model repository, and how it is built and stopped.

`build_server` assembles one `grpc.Server` from a `ServeConfig` and an `InferencePipeline`:
`aet.v1.EmbeddingService`, `grpc.health.v1.Health` (overall "" and one entry per model name,
following model state), server reflection, and any further services, interceptors and
credentials the caller passes; streaming calls are bounded (`CallTracker`). `build_app` is the
whole `aet serve` from its config: the KServe v2 API beside ours, the same v2 API over HTTP on
`--http-port` (`server.http`), the repository reloader, Prometheus metrics, bearer tokens and
TLS as configured. `serve` (the command) runs it until SIGTERM or SIGINT, then shuts down
gracefully: for `drain_seconds` readiness fails (health NOT_SERVING, ServerReady and HTTP
ready false; liveness `LIVENESS_SERVICE` stays SERVING) while calls are still answered, then
new calls are refused and calls in flight and queued requests get `grace_period` seconds to
finish. Shutdown always ends within `drain_seconds` + `grace_period` + `STOP_MARGIN_S`: exit 0
when every call and queued request finished, `EXIT_WORK_CUT` (3) when the grace period ran out
first; a second signal exits at once with 3. Every lifecycle event is one JSON log line on
stderr.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aet.config import ConfigError, add_config_arguments, config_from_args
from aet.errors import UserError
from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto.descriptors import ReflectionPools
from aet.repository import scan_repository
from aet.runtime import RuntimeOptions
from aet.server.auth import (
    LIVENESS_SERVICE,
    BearerTokenInterceptor,
    TokenCheck,
    read_tokens,
    tls_server_credentials,
)
from aet.server.control import ModelControl
from aet.server.embedding_service import EmbeddingService
from aet.server.http import HttpEndpoint, RestApi, start_http
from aet.server.kserve_service import SERVICE_NAME as KSERVE_SERVICE
from aet.server.kserve_service import InferenceService
from aet.server.metrics import MetricsEndpoint, ServingMetrics
from aet.server.models import BatchingOptions, ModelRegistry, ModelState
from aet.server.pipeline import InferencePipeline
from aet.server.reload import RepositoryReloader
from aet.server.streams import CallTracker, StreamWindow
from aet.server.telemetry import RequestTelemetry, tracer_from_environment

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

EMBEDDING_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
MIB = 1 << 20
STOP_MARGIN_S = 2.0  # how long past the grace period shutdown may take before it gives up
EXIT_WORK_CUT = 3  # exit status when shutdown had to cut calls or queued requests


@dataclass
class ServeConfig:
    """Configuration of `aet serve` (flags or a TOML file with the same field names)."""

    repository: Path = field(
        default=Path("exported"),
        metadata={
            "help": "model repository: <repository>/<model>/<version>/{model.onnx,model.json}"
        },
    )
    host: str = field(
        default="127.0.0.1",
        metadata={"help": "address to bind; 0.0.0.0 exposes the server to the network"},
    )
    port: int = field(default=8500, metadata={"help": "port to bind; 0 picks a free one (logged)"})
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    max_message_mb: int = field(
        default=64,
        metadata={
            "help": "largest gRPC message in MiB, each way; 64 MiB carries one request of up to "
            "21,399 float32 or 85,597 uint8 rows of 1x28x28 pixels (max_request_rows "
            "applies too)"
        },
    )
    workers: int = field(
        default=64, metadata={"help": "gRPC handler threads: the most calls served at once"}
    )
    max_streams: int | None = field(
        default=None,
        metadata={
            "help": "streaming calls open at once (each holds a handler thread); beyond it "
            "RESOURCE_EXHAUSTED. Below --workers, so unary calls and health checks always "
            "find a thread (default: half of --workers)"
        },
    )
    stream_window: int = field(
        default=16,
        metadata={"help": "requests of one stream started ahead of their answers, at most"},
    )
    stream_window_mb: float = field(
        default=8.0,
        metadata={
            "help": "MiB of one stream's requests started ahead of their answers; the next "
            "request is read only below it (so at most this plus one message)"
        },
    )
    grace_period: float = field(
        default=10.0,
        metadata={"help": "seconds in-flight and queued requests get to finish on SIGTERM/SIGINT"},
    )
    poll_repository: float = field(
        default=0.0,
        metadata={
            "help": "seconds between repository scans that load new versions and unload removed "
            "ones (0: load once at start)"
        },
    )
    metrics_port: int | None = field(
        default=None,
        metadata={
            "help": "serve Prometheus /metrics over HTTP on this port of --host (0: any free "
            "port, logged; unset: no endpoint)"
        },
    )
    token_file: Path | None = field(
        default=None,
        metadata={
            "help": "file of accepted bearer tokens, one per line: calls without one get "
            "UNAUTHENTICATED (the overall health Check stays open)"
        },
    )
    token_env: str | None = field(
        default=None,
        metadata={"help": "environment variable holding one more accepted bearer token"},
    )
    metrics_token: bool = field(
        default=False,
        metadata={
            "help": "/metrics requires the same bearer tokens as gRPC (Authorization: Bearer "
            "<token>); needs --token-file or --token-env"
        },
    )
    model_control: bool = field(
        default=False,
        metadata={
            "help": "allow loading and unloading models on request (KServe "
            "RepositoryModelLoad/Unload) to callers with an admin token (--admin-token-file); "
            "off: refused with PERMISSION_DENIED"
        },
    )
    admin_token_file: Path | None = field(
        default=None,
        metadata={
            "help": "file of admin bearer tokens, one per line, for --model-control (apart "
            "from --token-file; an admin token is accepted for inference too)"
        },
    )
    drain_seconds: float = field(
        default=5.0,
        metadata={
            "help": "on SIGTERM/SIGINT, seconds readiness reports not ready while calls are "
            "still answered, so load balancers stop sending first; then new calls are "
            "refused and --grace-period applies"
        },
    )
    access_log: bool = field(
        default=True,
        metadata={
            "help": "one JSON line per request on stderr: id, method, model, version, rows, "
            "status, queue and compute ms, peer (never tensors or tokens)"
        },
    )
    http_port: int | None = field(
        default=None,
        metadata={
            "help": "serve the KServe v2 REST API (HTTP/JSON with binary tensors) on this port "
            "of --host, with the same TLS and tokens as gRPC (0: any free port, logged; unset: "
            "no HTTP)"
        },
    )
    tls_cert: Path | None = field(
        default=None, metadata={"help": "PEM certificate chain: serve TLS (needs --tls-key)"}
    )
    tls_key: Path | None = field(default=None, metadata={"help": "PEM private key for --tls-cert"})
    tls_client_ca: Path | None = field(
        default=None,
        metadata={"help": "PEM CA that client certificates must be signed by (mutual TLS)"},
    )

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("host: expected an address such as 127.0.0.1, got ''")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port: expected 0..65535, got {self.port}")
        for name in ("max_message_mb", "workers", "stream_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected at least 1, got {getattr(self, name)}")
        for name in ("grace_period", "poll_repository", "drain_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: expected 0 or more, got {getattr(self, name)}")
        if self.max_streams is not None and not 1 <= self.max_streams < self.workers:
            raise ConfigError(
                f"max_streams: expected 1 to {self.workers - 1} (fewer than workers, so that "
                f"unary calls always find a thread), got {self.max_streams}"
            )
        if not self.stream_window_mb > 0:
            raise ConfigError(
                f"stream_window_mb: expected more than 0, got {self.stream_window_mb}"
            )
        if self.metrics_token and self.token_file is None and self.token_env is None:
            raise ConfigError(
                "metrics_token: needs --token-file or --token-env (the tokens /metrics accepts), "
                "got neither"
            )
        if self.model_control != (self.admin_token_file is not None):
            raise ConfigError(
                f"model_control, admin_token_file: expected both (model control for admin "
                f"tokens) or neither, got model_control={self.model_control} and "
                f"admin_token_file={self.admin_token_file}"
            )
        for name in ("metrics_port", "http_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ConfigError(f"{name}: expected 0..65535, got {port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                f"tls_cert, tls_key: expected both (TLS) or neither, got "
                f"tls_cert={self.tls_cert} and tls_key={self.tls_key}"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                f"tls_client_ca: needs --tls-cert and --tls-key, got only "
                f"tls_client_ca={self.tls_client_ca}"
            )

    @property
    def stream_slots(self) -> int:
        """Streaming calls open at once: `max_streams`, or half of `workers` when unset."""
        return self.max_streams if self.max_streams is not None else max(1, self.workers // 2)

    @functools.cached_property
    def window(self) -> StreamWindow:
        """Read-ahead limits of one streaming call (one object: both APIs record into it)."""
        return StreamWindow(self.stream_window, round(self.stream_window_mb * MIB))


@dataclass(frozen=True)
class ServiceBinding:
    """A further service for `build_server`: its full name (listed by reflection, reported by
    health) and the generated `add_<Service>Servicer_to_server` call that registers it."""

    name: str  # e.g. "inference.GRPCInferenceService"
    add_to_server: Callable[[grpc.Server], None]


class RunningServer:
    """A started server: its bound port, health service, pipeline, and graceful `stop`."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        pipeline: InferencePipeline,
        calls: CallTracker,
        service_names: Sequence[str],
    ) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.pipeline = pipeline
        self.registry = pipeline.registry
        self.calls = calls
        self.end_drain = threading.Event()  # set to end a drain window early (tests, signals)
        self.refusing = threading.Event()  # set once new calls are refused (after the drain)
        self._service_names = ("", *service_names)
        self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.registry.add_state_listener(lambda status: self._refresh_health(status.name))
        for name in self.registry.names():
            self._refresh_health(name)
        self._refresh_health(None)

    def _refresh_health(self, model: str | None) -> None:
        """Per model: SERVING with a READY version. Overall and per service: any model READY.
        Everything but liveness NOT_SERVING once the server drains toward a stop."""
        serving, not_serving = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.NOT_SERVING,
        )
        draining = self.pipeline.draining.is_set()
        for name in [model] if model is not None else self.registry.names():
            ready = self.registry.is_ready(name) and not draining
            self.health.set(name, serving if ready else not_serving)
        overall = any(self.registry.is_ready(name) for name in self.registry.names())
        for name in self._service_names:
            self.health.set(name, serving if overall and not draining else not_serving)

    def drain(self, seconds: float, reason: str = "stop requested") -> None:
        """The first step of a stop: for `seconds` (or until `end_drain` is set) readiness
        fails (health, KServe ServerReady, HTTP ready) while calls are still answered, so
        that load balancers stop sending before anything is refused; liveness
        (`LIVENESS_SERVICE`) stays SERVING."""
        log.info("shutdown_started", extra={"reason": reason, "drain_s": seconds})
        self.pipeline.draining.set()
        self._refresh_health(None)
        if seconds > 0 and not self.end_drain.wait(seconds):
            log.info("drain_finished", extra={"seconds": seconds})

    def stop(self, grace_period: float, reason: str = "stop requested") -> bool:
        """Refuse new calls and let work finish (after `drain`, if any); True if all did.

        Returns within `grace_period` + `STOP_MARGIN_S` whatever the calls in flight do
        (grpc's own stop can wait forever on a call it lost track of).
        """
        if not self.pipeline.draining.is_set():
            self.drain(0.0, reason)
        log.info("refusing_new_calls", extra={"reason": reason, "grace_period_s": grace_period})
        started = time.monotonic()
        self.health.enter_graceful_shutdown()
        # Half the margin past the grace period for grpc, the rest (at least) for the batchers,
        # whose idle workers need a moment to see that they are closed.
        deadline = started + grace_period + STOP_MARGIN_S
        grpc_stopped = self.server.stop(grace_period)
        self.refusing.set()
        stopped = grpc_stopped.wait(grace_period + STOP_MARGIN_S / 2)
        drained = self.registry.close(max(deadline - time.monotonic(), STOP_MARGIN_S / 2))
        calls_cut = self.calls.calls
        log.info(
            "shutdown_finished",
            extra={
                "seconds": round(time.monotonic() - started, 3),
                "drained": drained,
                "calls_cut": calls_cut,
                "grpc_stopped": stopped,
            },
        )
        return drained and calls_cut == 0


def build_server(
    config: ServeConfig,
    pipeline: InferencePipeline,
    services: Sequence[ServiceBinding] = (),
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> RunningServer:
    """Bind and start a server with the embedding, health and reflection services plus `services`.

    `interceptors` wrap every call (e.g. authentication); `credentials` switch the port to TLS.
    At most `config.stream_slots` streaming calls run at once. Raises `UserError` if the address
    cannot be bound.
    """
    message_bytes = config.max_message_mb * MIB
    calls = CallTracker(config.stream_slots)
    server = grpc.server(
        ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="grpc"),
        interceptors=[*interceptors, calls],  # refused (unauthenticated) calls take no stream
        options=[
            ("grpc.max_receive_message_length", message_bytes),
            ("grpc.max_send_message_length", message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )  # a taken port must fail, not be shared
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
        EmbeddingService(pipeline, config.window), server
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in services:
        service.add_to_server(server)
    service_names = [EMBEDDING_SERVICE, *(service.name for service in services)]
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server, ReflectionPools()
    )
    address = f"{config.host}:{config.port}"
    try:
        port = (
            server.add_secure_port(address, credentials)
            if credentials is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as exc:
        raise UserError(f"host/port: cannot bind {address}: {exc}") from exc
    server.start()
    return RunningServer(server, port, health_servicer, pipeline, calls, service_names)


@dataclass
class App:
    """A built `aet serve`: the server with both APIs over one pipeline, the repository
    reloader and, when configured, the metrics endpoint. `load` fills it, `stop` ends it."""

    config: ServeConfig
    running: RunningServer
    metrics: ServingMetrics
    reloader: RepositoryReloader
    metrics_endpoint: MetricsEndpoint | None
    authenticated: bool
    http: HttpEndpoint | None = None

    @property
    def http_port(self) -> int | None:
        """The bound port of the KServe v2 REST API (None when `http_port` is unset)."""
        return None if self.http is None else self.http.port

    @property
    def registry(self) -> ModelRegistry:
        return self.running.registry

    @property
    def target(self) -> str:
        """`host:port` of the gRPC server."""
        return f"{self.config.host}:{self.running.port}"

    def load(self) -> None:
        """Load the repository, then keep polling it if `poll_repository` is set."""
        self.reloader.sync()
        if self.config.poll_repository:
            self.reloader.start_polling(self.config.poll_repository)

    def stop(
        self,
        grace_period: float | None = None,
        reason: str = "stop requested",
        drain: float | None = None,
    ) -> bool:
        """Stop polling, drain (`RunningServer.drain`: both front ends keep answering while
        readiness fails), then stop both gracefully: HTTP stops accepting when gRPC does and
        its requests in flight get the same grace period (`RunningServer.stop`); drain window
        and grace period default to the config's. Closes the metrics endpoint; True if all
        work finished."""
        self.reloader.stop_polling()
        grace = self.config.grace_period if grace_period is None else grace_period
        try:
            self.running.drain(self.config.drain_seconds if drain is None else drain, reason)
            started = time.monotonic()
            if self.http is not None:
                self.http.begin_stop()
            finished = self.running.stop(grace, reason)
            if self.http is not None:
                remaining = started + grace + STOP_MARGIN_S - time.monotonic()
                finished = self.http.stop(max(remaining, STOP_MARGIN_S / 2)) and finished
            return finished
        finally:
            if self.metrics_endpoint is not None:
                self.metrics_endpoint.close()


def build_app(
    config: ServeConfig,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    tracer: Tracer | None = None,
) -> App:
    """Assemble and start `aet serve` from `config`, its repository not loaded yet (`App.load`).

    Both APIs (aet.v1 and KServe v2) are registered alike over one pipeline; bearer tokens,
    TLS and the Prometheus endpoint as configured; the access log unless turned off; spans
    to `tracer`, by default the one the `OTEL_*` variables configure (if any).
    `interceptors` run after authentication (e.g. to observe calls).
    """
    registry = ModelRegistry(config.runtime, config.batching)
    metrics = ServingMetrics(config.batching.max_batch_size)
    metrics.watch_registry(registry)
    tracer = tracer or tracer_from_environment()
    pipeline = InferencePipeline(registry, metrics, RequestTelemetry(config.access_log, tracer))
    reloader = RepositoryReloader(registry, config.repository)
    admin = frozenset() if config.admin_token_file is None else read_tokens(config.admin_token_file)
    control = ModelControl(reloader, TokenCheck(admin) if admin else None)
    kserve = InferenceService(pipeline, control, config.window)
    auth = (
        BearerTokenInterceptor(read_tokens(config.token_file, config.token_env) | admin)
        if config.token_file is not None or config.token_env is not None
        else None
    )
    tls_files = (
        None
        if config.tls_cert is None or config.tls_key is None  # both or neither (ServeConfig)
        else (config.tls_cert, config.tls_key, config.tls_client_ca)
    )
    credentials = None if tls_files is None else tls_server_credentials(*tls_files)
    endpoint = (
        None
        if config.metrics_port is None
        else metrics.serve_http(
            config.metrics_port,
            config.host,
            auth.check if config.metrics_token and auth is not None else None,
        )
    )
    services = [ServiceBinding(KSERVE_SERVICE, kserve.add_to_server)]
    http = None
    try:
        if config.http_port is not None:
            rest = RestApi(
                pipeline,
                control,
                auth.check if auth is not None else None,
                config.max_message_mb * MIB,
                config.workers,
            )
            http = start_http(rest, config.host, config.http_port, config.grace_period, tls_files)
        running = build_server(
            config, pipeline, services, [*([auth] if auth else []), *interceptors], credentials
        )
    except BaseException:
        if http is not None:
            http.stop(STOP_MARGIN_S)
        if endpoint is not None:
            endpoint.close()
        raise
    log.info(
        "server_started",
        extra={
            "host": config.host,
            "port": running.port,
            "providers": registry.providers,
            "repository": str(config.repository),
            "tls": credentials is not None,
            "auth": auth is not None,
            "model_control": control.admin is not None,
            "access_log": config.access_log,
            "tracing": tracer is not None,
            "metrics_port": None if endpoint is None else endpoint.port,
            "metrics_auth": config.metrics_token,
            "http_port": None if http is None else http.port,
        },
    )
    return App(config, running, metrics, reloader, endpoint, auth is not None, http)


def serve(config: ServeConfig, stop: threading.Event | None = None) -> int:
    """Serve `config.repository` until `stop` is set or SIGTERM/SIGINT arrives; exit code.

    Returns 0 after a clean shutdown, `EXIT_WORK_CUT` when the grace period cut calls or
    queued requests.
    """
    scan_repository(config.repository)  # a missing repository fails before anything binds
    app = build_app(config)
    stop = stop or threading.Event()
    received: list[str] = []

    def on_signal(signum: int, frame) -> None:  # only flag it: logging here could deadlock
        if received:  # a second signal: the operator will not wait for the grace period
            os._exit(EXIT_WORK_CUT)
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    finished = False
    try:
        app.load()
        log.info(
            "server_ready",
            extra={
                "port": app.running.port,
                "ready": [f"{m.name}/{m.version}" for m in app.registry],
                "failed": [
                    f"{s.name}/{s.version}"
                    for s in app.registry.statuses()
                    if s.state is ModelState.FAILED
                ],
            },
        )
        stop.wait()
    finally:
        finished = app.stop(reason=", ".join(received) or "stop requested")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if finished else EXIT_WORK_CUT


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, event (the message) and its fields."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in self._STANDARD)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging() -> None:
    """Send the `server` package's INFO and above to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logger = logging.getLogger("aet.server")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Flags of `aet serve`: one per `ServeConfig` field, plus `--config`."""
    add_config_arguments(parser, ServeConfig)


def run(args: argparse.Namespace) -> int:
    """`aet serve`: serve until SIGTERM or SIGINT; 0, or `EXIT_WORK_CUT` if work was cut."""
    configure_logging()
    code = serve(config_from_args(ServeConfig, args))
    if code != 0:
        # Calls that outlived the grace period may still hold handler threads, which the
        # interpreter would wait for at exit: leave now, as the shutdown bound promises.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
