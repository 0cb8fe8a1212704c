"""The KServe v2 / Open Inference Protocol over HTTP/REST, beside gRPC on its own port.

A Starlette app served by uvicorn in a background thread (`start_http`), on `--http-port` of
the same host, with the same TLS files and bearer tokens as gRPC. Requests go through the one
`InferencePipeline` (api label "http") and the protocol-neutral `server.v2`: this module only
reads HTTP requests and writes HTTP responses.

Paths: `GET /v2/health/live`, `/v2/health/ready` (both open without a token, as gRPC's overall
health), `GET /v2` (server metadata), `GET /v2/models/{name}[/versions/{v}]` (metadata),
`.../ready`, `.../config`, `.../stats` (and `/v2/models/stats`), `POST .../infer`, and Triton's
repository extension `POST /v2/repository/index`, `/v2/repository/models/{name}/load|unload`.

Inference requests are JSON, with the binary tensor data extension: after a JSON header of
`Inference-Header-Content-Length` bytes, each input with `parameters.binary_data_size` has its
raw little-endian bytes, in order. Outputs leave as JSON `data` (flat, row-major) or, with
`parameters.binary_data` (per output) or `binary_data_output` (the request's default), as raw
bytes after the JSON header. Bodies may be gzip or deflate compressed (`Content-Encoding`) and
responses are when `Accept-Encoding` asks. Errors are `{"error": "<message>"}` with the HTTP
status of their gRPC code (`HTTP_STATUS`) and the same message as gRPC.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import socket
import ssl
import threading
import zlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import grpc
import numpy as np
import uvicorn
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from aet.errors import UserError
from aet.proto.codec import decode_raw
from aet.server import v2
from aet.server.auth import SecurityConfigError, TokenCheck
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
from aet.server.reload import RepositoryReloader
from aet.server.validation import validate_inputs

log = logging.getLogger(__name__)

API_LABEL = "http"
HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = tuple(sorted((*v2.EXTENSIONS, "binary_tensor_data")))
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,  # the queue is full: retry later
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
NOT_READY = 400  # the v2 protocol: "a 4xx status code indicates false"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
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


def message_json(message: Message) -> dict:
    """A protobuf message of Triton's schema as Triton's HTTP API prints it: field names as in
    the .proto, fields at their defaults included, 64-bit integers as JSON numbers."""
    printed = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _numbers(message.DESCRIPTOR, printed)


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _numbers(descriptor: Descriptor, printed: dict) -> dict:
    """`printed` with the 64-bit integers protobuf's JSON writes as strings turned to ints."""

    def convert(fd: FieldDescriptor, value: Any) -> Any:
        if fd.message_type is not None:
            return _numbers(fd.message_type, value)
        return int(value) if fd.type in _INT64 else value

    for fd in descriptor.fields:
        if fd.name not in printed:
            continue
        value = printed[fd.name]
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            entry = fd.message_type.fields_by_name["value"]
            printed[fd.name] = {key: convert(entry, item) for key, item in value.items()}
        elif isinstance(value, list):
            printed[fd.name] = [convert(fd, item) for item in value]
        else:
            printed[fd.name] = convert(fd, value)
    return printed


# -- request bodies ---------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, decompressed per `Content-Encoding`; `BodyTooLarge` past `limit`
    bytes (sent or decompressed), `InvalidArgument` for an unknown or broken encoding."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
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


def parse_json(data: bytes, what: str) -> dict:
    """`data` as a JSON object; `InvalidArgument` naming `what` otherwise."""
    try:
        parsed = json.loads(data) if data.strip() else {}
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        position = (
            f" at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else ""
        )
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8"
        raise InvalidArgument(
            f"{what}: expected a JSON object, got invalid JSON ({reason}{position})"
        ) from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(f"{what}: expected a JSON object, got a JSON {type(parsed).__name__}")
    return parsed


_JSON_TYPES = {str: "a string", bool: "true or false", int: "an integer", dict: "an object"}
_JSON_TYPES |= {list: "a list"}


def checked(value: Any, kind: type, field: str) -> Any:
    """`value` if it is a JSON `kind` (true and false are no integers), else `InvalidArgument`."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        got = f"a JSON {type(value).__name__}" if isinstance(value, dict | list) else excerpt(value)
        raise InvalidArgument(f"{field}: expected {_JSON_TYPES[kind]}, got {got}")
    return value


def typed(container: Mapping, key: str, kind: type, field: str, default: Any = None) -> Any:
    """`container[key]`, `checked` to be a `kind`; `default` if absent."""
    return checked(container[key], kind, field) if key in container else default


@dataclass
class RestInput:
    """One entry of a request's `inputs`, its data as JSON values or binary bytes."""

    name: str
    datatype: str
    shape: list[int]
    data: Any = None  # the JSON `data`, when not binary
    binary_size: int | None = None  # `parameters.binary_data_size`, when binary
    binary: bytes | None = None  # its part of the binary section, once split


@dataclass
class RestRequest:
    """An inference request's JSON header and binary section, read and checked for form."""

    id: str | None
    inputs: list[RestInput]
    requested: list[v2.RequestedOutput]
    binary_outputs: dict[str, bool]  # output name -> its `binary_data` parameter, when given
    binary_default: bool  # the `binary_data_output` request parameter
    timeout: float | None


def parse_infer_request(body: bytes, header_length: str | None) -> RestRequest:
    """Split the body into its JSON header and binary section and read both; every fault is
    `InvalidArgument` naming the field (no model is needed yet)."""
    length = None
    if header_length is not None:
        if not header_length.strip().isdigit() or not 0 < int(header_length) <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH}: expected the JSON header's length in bytes, 1 to "
                f"{len(body)} (the body's length), got {excerpt(header_length)}"
            )
        length = int(header_length)
    what = "body" if length is None else f"body[:{HEADER_LENGTH}] ({length} bytes)"
    header = parse_json(body if length is None else body[:length], what)
    parameters = typed(header, "parameters", dict, "parameters", {})
    v2.check_parameters(parameters)
    timeout = typed(parameters, "timeout", int, "parameters['timeout']")
    inputs = [
        _input(entry, i) for i, entry in enumerate(typed(header, "inputs", list, "inputs", []))
    ]
    requested, binary_outputs = [], {}
    for i, entry in enumerate(typed(header, "outputs", list, "outputs", [])):
        entry = checked(entry, dict, f"outputs[{i}]")
        name = typed(entry, "name", str, f"outputs[{i}].name", "")
        params = typed(entry, "parameters", dict, f"outputs[{i}].parameters", {})
        count_field = f"outputs[{i}].parameters['{v2.CLASSIFICATION_PARAMETER}']"
        count = typed(params, v2.CLASSIFICATION_PARAMETER, int, count_field)
        requested.append(v2.RequestedOutput(name, count))
        binary = typed(params, "binary_data", bool, f"outputs[{i}].parameters['binary_data']")
        if binary is not None:
            binary_outputs[name] = binary
    _split_binary(inputs, body[length:] if length is not None else None)
    return RestRequest(
        id=typed(header, "id", str, "id"),
        inputs=inputs,
        requested=requested,
        binary_outputs=binary_outputs,
        binary_default=typed(
            parameters, "binary_data_output", bool, "parameters['binary_data_output']", False
        ),
        timeout=None if timeout is None else v2.timeout_seconds(timeout),
    )


def _input(entry: Any, i: int) -> RestInput:
    """`inputs[i]` read for form: name, datatype, shape, and where its data is."""
    entry = checked(entry, dict, f"inputs[{i}]")
    shape = typed(entry, "shape", list, f"inputs[{i}].shape", [])
    for dim in shape:
        checked(dim, int, f"inputs[{i}].shape")
    size_field = f"inputs[{i}].parameters['binary_data_size']"
    params = typed(entry, "parameters", dict, f"inputs[{i}].parameters", {})
    size = typed(params, "binary_data_size", int, size_field)
    if size is not None and size < 0:
        raise InvalidArgument(f"{size_field}: expected a number of bytes >= 0, got {size}")
    if size is not None and "data" in entry:
        raise InvalidArgument(
            f"inputs[{i}].data: expected it absent when {size_field} is given, got both"
        )
    return RestInput(
        name=typed(entry, "name", str, f"inputs[{i}].name", ""),
        datatype=typed(entry, "datatype", str, f"inputs[{i}].datatype", ""),
        shape=shape,
        data=entry.get("data"),
        binary_size=size,
    )


def _split_binary(inputs: list[RestInput], section: bytes | None) -> None:
    """Give each input that declared `binary_data_size` its bytes of the binary section; the
    section must hold exactly what they declare."""
    binary = [tensor for tensor in inputs if tensor.binary_size is not None]
    declared = sum(tensor.binary_size or 0 for tensor in binary)
    if section is None:
        if binary:
            raise InvalidArgument(
                f"{HEADER_LENGTH}: expected the header with binary inputs (parameters."
                f"binary_data_size of {binary[0].name or 'inputs'}), got none"
            )
        return
    if len(section) != declared:
        raise InvalidArgument(
            f"binary data: expected {declared} bytes after the JSON header (the sum of the "
            f"inputs' parameters.binary_data_size), got {len(section)}"
        )
    offset = 0
    for tensor in binary:
        size = tensor.binary_size or 0
        tensor.binary = section[offset : offset + size]
        offset += size


def decode_input(request: RestRequest, model: LoadedModel) -> np.ndarray:
    """The request's one input as a checked float32 array (rows, *row shape)."""
    tensor = request.inputs[0] if request.inputs else RestInput("", "", [])
    field, dtype = v2.check_input(
        len(request.inputs), tensor.name, tensor.datatype, tensor.shape, model
    )
    if tensor.binary is not None:
        array = decode_raw(tensor.binary, tensor.shape, dtype, field)
    else:
        array = _json_values(tensor, dtype, field)
    return validate_inputs(array, model.request_spec, field)


def _json_values(tensor: RestInput, dtype: np.dtype, field: str) -> np.ndarray:
    """The tensor's JSON `data` (flat or nested lists of numbers) as an array of its shape."""
    count = math.prod(tensor.shape)
    if tensor.data is None:
        raise InvalidArgument(
            f"{field}.data: expected {count} values for shape {tensor.shape} (or binary data "
            "with parameters.binary_data_size), got none"
        )
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError):  # ragged nesting, numbers too large for any dtype
        values = np.asarray([], dtype=object)
    if values.dtype.kind not in "iuf" or (values.size == 0 and count != 0):
        raise InvalidArgument(
            f"{field}.data: expected numbers as a flat or evenly nested list, got "
            f"{excerpt(tensor.data)}"
        )
    if values.size != count:
        raise InvalidArgument(
            f"{field}.data: expected {count} values for shape {tensor.shape}, got {values.size}"
        )
    if dtype == np.uint8:
        bad = values[(values < 0) | (values > 255) | (values != np.round(values))]
        if bad.size:
            raise InvalidArgument(
                f"{field}.data: expected UINT8 values, whole numbers 0..255, got {bad.flat[0]}"
            )
    return values.astype(dtype).reshape(tensor.shape)


def infer_body(
    request: RestRequest, model: LoadedModel, outputs: Outputs
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: each output of `v2.response_tensors` as JSON `data`
    or, when asked, as bytes after the JSON header (`Inference-Header-Content-Length`)."""
    header: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version)}
    if request.id is not None:
        header["id"] = request.id
    entries, binary = [], []
    for tensor in v2.response_tensors(request.requested, model, outputs):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.array.shape),
        }
        if request.binary_outputs.get(tensor.name, request.binary_default):
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = tensor.array.ravel().tolist()
        entries.append(entry)
    header["outputs"] = entries
    text = json.dumps(header, separators=(",", ":")).encode()
    if not binary:
        return text, {"Content-Type": JSON_TYPE}
    return b"".join([text, *binary]), {
        "Content-Type": BINARY_TYPE,
        HEADER_LENGTH: str(len(text)),
    }


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
    """The v2 REST endpoints over one pipeline and reloader; `app()` is the Starlette app."""

    def __init__(
        self,
        pipeline: InferencePipeline,
        reloader: RepositoryReloader,
        token_check: TokenCheck | None,
        max_body_bytes: int,
        workers: int,
    ) -> None:
        self.pipeline = pipeline
        self.registry = pipeline.registry
        self.reloader = reloader
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
        ready = v2.server_ready(self.registry)
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
        index = await self._blocking(
            lambda: v2.repository_index(self.registry, self.reloader, ready)
        )
        return _json(message_json(index)["models"])

    async def load(self, request: Request) -> Response:
        name, parameters = await self._repository_request(request)
        await self._blocking(lambda: v2.load_model(self.reloader, name, parameters))
        return _json({})

    async def unload(self, request: Request) -> Response:
        name, parameters = await self._repository_request(request)
        await self._blocking(lambda: v2.unload_model(self.reloader, name, parameters))
        return _json({})

    async def _repository_request(self, request: Request) -> tuple[str, dict]:
        body = parse_json(await read_body(request, self.max_body_bytes), "body")
        return request.path_params["name"], typed(body, "parameters", dict, "parameters", {})

    async def infer(self, request: Request) -> Response:
        name, version = _model_path(request)
        body, refused = b"", None
        try:
            body = await read_body(request, self.max_body_bytes)
        except Exception as exc:  # recorded like every other failed request
            refused = exc
        header_length = request.headers.get(HEADER_LENGTH)
        accept = request.headers.get("accept-encoding", "")

        def work() -> tuple[bytes, dict[str, str]]:
            encode: Callable[[LoadedModel, Outputs], tuple[bytes, dict[str, str]]] = _never
            try:
                if refused is not None:
                    raise refused
                parsed = parse_infer_request(body, header_length)
            except Exception as exc:  # `finish` records it and raises it
                inference = self.pipeline.failed(API_LABEL, name, exc)
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
                )
                encode = functools.partial(infer_body, parsed)

            content, headers = self.pipeline.finish(inference, encode)[0]
            return compressed(content, headers, accept), headers

        content, headers = await self._blocking(work)
        return Response(content, 200, headers)


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
