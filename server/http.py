"""The KServe v2 / Open Inference Protocol over HTTP/REST, beside gRPC on its own port.

A Starlette app served by uvicorn in a background thread (`start_http`), on `--http-port` of
the same host, with the same TLS files and bearer tokens as gRPC. Requests go through the one
`InferencePipeline` (api label "http") and the protocol-neutral `server.v2`: this module only
reads HTTP requests and writes HTTP responses.

Paths: `GET /v2/health/live`, `/v2/health/ready` (both open without a token, as gRPC's overall
health), `GET /v2` (server metadata), `GET /v2/models/{name}[/versions/{v}]` (metadata),
`.../ready`, `.../config`, `.../stats` (and `/v2/models/stats`), `POST .../infer`, and Triton's
repository extension `POST /v2/repository/index`, `/v2/repository/models/{name}/load|unload`.

Inference bodies are JSON with the binary tensor data extension (`server.rest_codec`), gzip or
deflate compressed when `Content-Encoding` says so; answers are compressed when
`Accept-Encoding` asks. Errors are `{"error": "<message>"}` with the HTTP status of their gRPC
code (`HTTP_STATUS`) and the same message as gRPC.
"""

from __future__ import annotations

import functools
import json
import math
import socket
import ssl
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aet.errors import UserError
from aet.server import v2
from aet.server.auth import SecurityConfigError, TokenCheck
from aet.server.control import ModelControl
from aet.server.errors import (
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    excerpt,
    grpc_status,
    status_code,
)
from aet.server.models import LoadedModel
from aet.server.pipeline import InferencePipeline, Outputs
from aet.server.rest_codec import (
    HEADER_LENGTH,
    JSON_TYPE,
    decode_input,
    infer_body,
    message_json,
    parse_infer_request,
    parse_json,
    typed,
)
from aet.server.telemetry import REQUEST_ID_KEY, CallInfo, request_id, trace_headers

API_LABEL = "http"
EXTENSIONS = tuple(sorted((*v2.EXTENSIONS, "binary_tensor_data")))
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,  # the queue is full: retry later
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
NOT_READY = 400  # the v2 protocol: "a 4xx status code indicates false"
DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    "gzip": lambda: zlib.decompressobj(16 + zlib.MAX_WBITS),
    "deflate": zlib.decompressobj,  # HTTP's "deflate" is the zlib format (RFC 9110)
}
COMPRESSORS: dict[str, Callable[[], Any]] = {
    "gzip": lambda: zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS),
    "deflate": lambda: zlib.compressobj(6),
}


class BodyTooLarge(ResourceExhausted):
    """A request body (or its decompressed form) over the message limit: HTTP 413."""


def http_status(exc: BaseException) -> int:
    """The HTTP status of an exception raised serving a request (500 for the unexpected)."""
    if isinstance(exc, BodyTooLarge):
        return 413
    return HTTP_STATUS.get(status_code(exc), 500)


def error_response(exc: BaseException) -> Response:
    """`{"error": message}` with the exception's HTTP status; the message is gRPC's."""
    status = http_status(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    body = json.dumps({"error": grpc_status(exc)[1]})
    return Response(body, status, headers, media_type=JSON_TYPE)


# -- request bodies ---------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed per `Content-Encoding`; `BodyTooLarge` past `limit`
    bytes (sent or decompressed), `InvalidArgument` for an unknown or broken encoding."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(_too_large("body", int(declared), limit))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(_too_large("body", size, limit, "at least "))
        chunks.append(chunk)
    body = b"".join(chunks)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in DECOMPRESSORS:
        raise InvalidArgument(
            f"Content-Encoding: expected gzip, deflate or identity, got {excerpt(encoding)}"
        )
    decompressor = DECOMPRESSORS[encoding]()
    try:
        plain = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidArgument(
            f"body: expected a {encoding} stream (Content-Encoding: {encoding}), got "
            f"{len(body)} bytes that do not decompress ({exc})"
        ) from None
    if len(plain) > limit:
        raise BodyTooLarge(_too_large(f"body ({encoding}-decompressed)", len(plain), limit, ">= "))
    if not decompressor.eof:
        raise InvalidArgument(
            f"body: expected a complete {encoding} stream (Content-Encoding: {encoding}), got "
            f"{len(body)} bytes that end before it does"
        )
    return plain


def _too_large(what: str, size: int, limit: int, qualifier: str = "") -> str:
    return f"{what}: expected at most {limit} bytes (--max-message-mb), got {qualifier}{size} bytes"


def response_encoding(accept_encoding: str) -> str | None:
    """gzip or deflate when `Accept-Encoding` accepts it (gzip first), else None."""
    accepted = set()
    for part in accept_encoding.lower().split(","):
        name, _, params = part.partition(";")
        quality = params.strip().removeprefix("q=")
        if quality and params.strip().startswith("q="):
            try:
                if float(quality) <= 0:
                    continue
            except ValueError:
                continue
        accepted.add(name.strip())
    return next((name for name in COMPRESSORS if name in accepted), None)


def compressed(body: bytes, headers: dict[str, str], accept_encoding: str) -> bytes:
    """`body`, compressed as `Accept-Encoding` asks (`Content-Encoding` added to `headers`)."""
    encoding = response_encoding(accept_encoding)
    if encoding is None:
        return body
    compressor = COMPRESSORS[encoding]()
    headers["Content-Encoding"] = encoding
    headers["Vary"] = "Accept-Encoding"
    return compressor.compress(body) + compressor.flush()


# -- the app ----------------------------------------------------------------------------------

Handler = Callable[[Request], Awaitable[Response]]


class RestApi:
    """The v2 REST endpoints over one pipeline and model control; `app()` is the Starlette
    app."""

    def __init__(
        self,
        pipeline: InferencePipeline,
        control: ModelControl,
        token_check: TokenCheck | None,
        max_body_bytes: int,
        workers: int,
    ) -> None:
        self.pipeline = pipeline
        self.registry = pipeline.registry
        self.control = control
        self.token_check = token_check
        self.max_body_bytes = max_body_bytes
        self.workers = workers
        self._limiter: anyio.CapacityLimiter | None = None

    def app(self) -> Starlette:
        """Routes (the more specific first), each behind `_endpoint`."""
        model = "/v2/models/{name}"
        version = "/v2/models/{name}/versions/{version}"
        routes = [
            Route("/v2/health/live", self._endpoint(self.live, open_=True)),
            Route("/v2/health/ready", self._endpoint(self.ready, open_=True)),
            Route("/v2", self._endpoint(self.server_metadata)),
            Route("/v2/models/stats", self._endpoint(self.stats)),
            Route("/v2/repository/index", self._endpoint(self.index), methods=["POST"]),
            Route(
                "/v2/repository/models/{name}/load",
                self._endpoint(self.load),
                methods=["POST"],
            ),
            Route(
                "/v2/repository/models/{name}/unload",
                self._endpoint(self.unload),
                methods=["POST"],
            ),
        ]
        for prefix in (model, version):
            routes += [
                Route(prefix, self._endpoint(self.model_metadata)),
                Route(f"{prefix}/ready", self._endpoint(self.model_ready)),
                Route(f"{prefix}/config", self._endpoint(self.config)),
                Route(f"{prefix}/stats", self._endpoint(self.stats)),
                Route(f"{prefix}/infer", self._endpoint(self.infer), methods=["POST"]),
            ]
        return Starlette(routes=routes, exception_handlers={HTTPException: self._no_route})

    def _endpoint(self, handler: Handler, open_: bool = False) -> Handler:
        """`handler` behind the token check (unless `open_`), its errors as JSON bodies."""

        async def endpoint(request: Request) -> Response:
            try:
                if self.token_check is not None and not open_:
                    refusal = self.token_check.refusal(request.headers.get("authorization"))
                    if refusal is not None:
                        raise Unauthenticated(refusal)
                return await handler(request)
            except Exception as exc:
                return error_response(exc)

        return endpoint

    async def _no_route(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = (
            f"{request.method} {excerpt(request.url.path)}: expected a KServe v2 path "
            "(/v2/health/live, /v2/models/<name>/infer, ...) with its method, got "
            + ("an unknown path" if status == 404 else f"HTTP status {status}")
        )
        return Response(json.dumps({"error": message}), status, media_type=JSON_TYPE)

    async def _blocking(self, work: Callable[[], Any]) -> Any:
        """Run `work` in a worker thread (at most `workers` at once), off the event loop."""
        if self._limiter is None:  # created in the loop that uses it
            self._limiter = anyio.CapacityLimiter(self.workers)
        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    # -- endpoints --------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.pipeline.server_ready()
        return _json({"ready": ready}, 200 if ready else NOT_READY)

    async def server_metadata(self, request: Request) -> Response:
        return _json(message_json(v2.server_metadata(EXTENSIONS)))

    async def model_metadata(self, request: Request) -> Response:
        name, version = _model_path(request)
        return _json(message_json(v2.model_metadata(self.pipeline, name, version)))

    async def model_ready(self, request: Request) -> Response:
        ready = v2.model_ready(self.pipeline, *_model_path(request))
        return _json({"ready": ready}, 200 if ready else NOT_READY)

    async def config(self, request: Request) -> Response:
        model = self.pipeline.lookup(*_model_path(request))
        return _json(message_json(v2.model_config(model)))

    async def stats(self, request: Request) -> Response:
        name, version = _model_path(request)
        return _json(
            message_json(v2.statistics(self.registry, self.pipeline.metrics, name, version))
        )

    async def index(self, request: Request) -> Response:
        body = parse_json(await read_body(request, self.max_body_bytes), "body")
        ready = typed(body, "ready", bool, "ready", False)
        index = await self._blocking(lambda: self.control.index(ready))
        return _json([vars(entry) for entry in index])

    async def load(self, request: Request) -> Response:
        name, parameters, authorization = await self._repository_request(request)
        await self._blocking(lambda: self.control.load(name, parameters, authorization))
        return _json({})

    async def unload(self, request: Request) -> Response:
        name, parameters, authorization = await self._repository_request(request)
        await self._blocking(lambda: self.control.unload(name, parameters, authorization))
        return _json({})

    async def _repository_request(self, request: Request) -> tuple[str, dict, str | None]:
        """The model name, the parameters and the `Authorization` header of a load/unload."""
        body = parse_json(await read_body(request, self.max_body_bytes), "body")
        parameters = typed(body, "parameters", dict, "parameters", {})
        return request.path_params["name"], parameters, request.headers.get("authorization")

    async def infer(self, request: Request) -> Response:
        name, version = _model_path(request)
        body, refused = b"", None
        try:
            body = await read_body(request, self.max_body_bytes)
        except Exception as exc:  # recorded like every other failed request
            refused = exc
        header_length = request.headers.get(HEADER_LENGTH)
        accept = request.headers.get("accept-encoding", "")
        client = request.client

        def call(message_id: str | None = None) -> CallInfo:
            return CallInfo(
                f"POST {request.url.path}",
                request_id(request.headers.get(REQUEST_ID_KEY), message_id),
                "" if client is None else f"{client.host}:{client.port}",
                trace_headers(request.headers.items()),
            )

        def work() -> Response:
            encode: Callable[[LoadedModel, Outputs], tuple[bytes, dict[str, str]]] = _never
            try:
                if refused is not None:
                    raise refused
                parsed = parse_infer_request(body, header_length)
            except Exception as exc:  # `finish` records it and raises it
                inference = self.pipeline.failed(API_LABEL, name, exc, call())
            else:

                def decode(model: LoadedModel) -> np.ndarray:
                    v2.check_requested_outputs(parsed.requested, model)
                    return decode_input(parsed, model)

                inference = self.pipeline.start(
                    API_LABEL,
                    name,
                    version,
                    decode,
                    (parsed.timeout,),
                    extra_outputs=v2.extra_outputs(parsed.requested),
                    call=call(parsed.id),
                )
                encode = functools.partial(infer_body, parsed)
            assert inference.call is not None  # given above
            try:
                content, headers = self.pipeline.finish(inference, encode)[0]
            except Exception as exc:
                response = error_response(exc)
                response.headers[REQUEST_ID_KEY] = inference.call.request_id
                return response
            headers[REQUEST_ID_KEY] = inference.call.request_id
            return Response(compressed(content, headers, accept), 200, headers)

        return await self._blocking(work)


def _never(model: LoadedModel, outputs: Outputs) -> Any:
    raise AssertionError("a refused request has no outputs to encode")


def _model_path(request: Request) -> tuple[str, str]:
    """The model name ("" when the path has none) and version ("" for the latest)."""
    return request.path_params.get("name", ""), request.path_params.get("version", "")


def _json(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value), status, media_type=JSON_TYPE)


# -- the server -------------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling when it listens (or gave up)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.listening.set()


@dataclass
class HttpEndpoint:
    """The running HTTP front end: its bound port, and `stop`."""

    port: int
    server: _Uvicorn
    thread: threading.Thread

    def begin_stop(self) -> None:
        """Stop accepting connections; requests in flight go on (`stop` waits for them)."""
        self.server.should_exit = True

    def stop(self, timeout: float) -> bool:
        """Stop and wait up to `timeout` seconds for requests in flight; True if all ended."""
        self.begin_stop()
        self.thread.join(timeout)
        return not self.thread.is_alive()


def start_http(
    api: RestApi,
    host: str,
    port: int,
    grace_period: float,
    tls: tuple[Path, Path, Path | None] | None = None,
) -> HttpEndpoint:
    """Serve `api` on `host:port` (0: any free port) in a daemon thread; with `tls` (cert,
    key, client CA or None), over TLS, requiring client certificates when a CA is given.

    Raises `UserError` naming the address when it cannot be bound, `SecurityConfigError`
    when the TLS files do not load.
    """
    ssl_options: dict[str, Any] = {}
    if tls is not None:
        cert, key, client_ca = tls
        ssl_options = dict(ssl_certfile=str(cert), ssl_keyfile=str(key))
        if client_ca is not None:
            ssl_options |= dict(ssl_ca_certs=str(client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    config = uvicorn.Config(
        api.app(),
        log_config=None,
        access_log=False,
        lifespan="off",
        http="h11",
        ws="none",
        loop="asyncio",
        timeout_graceful_shutdown=max(1, math.ceil(grace_period)),
        **ssl_options,
    )
    try:
        config.load()
    except (OSError, ssl.SSLError) as exc:
        raise SecurityConfigError(f"http TLS (--tls-cert, --tls-key): cannot load: {exc}") from exc
    try:
        family, kind, proto = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0][:3]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP,
        # and without it every keep-alive answer waits for a delayed ACK (about 40 ms).
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        raise UserError(f"http_port: cannot bind {host}:{port}: {exc.strerror or exc}") from exc
    server = _Uvicorn(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="http", daemon=True
    )
    thread.start()
    server.listening.wait()
    if not server.started:
        sock.close()
        raise UserError(f"http_port: the HTTP server on {host}:{port} did not start")
    return HttpEndpoint(sock.getsockname()[1], server, thread)
