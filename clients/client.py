"""`EmbeddingClient`: embeddings from an `aet serve` server over gRPC (`aet.v1.EmbeddingService`).

Arrays of any length are cut into requests that fit under the gRPC message limit and the
server's `max_request_rows`; one request goes as a unary `Embed`, more as one `EmbedStream`.

The client talks to one server or to replicas of it: a list of addresses, or a DNS name that
resolves to several, balanced per call by gRPC's `round_robin` policy. Retries are gRPC's own,
set in the channel's service config: UNAVAILABLE and RESOURCE_EXHAUSTED are retried with
exponential backoff and jitter, on whichever replica the policy picks next, all attempts
within the call's one deadline. Every other failure, and a stream broken after it answered,
raises `EmbeddingError` carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from aet.errors import UserError
from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto.codec import TensorCodecError, decode_tensor, encode_tensor

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default receive limit, on both sides
# Room for everything in a request or response besides the tensor bytes (names, shape, ids).
_ENVELOPE_BYTES = 4096
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
SERVICE = "aet.v1.EmbeddingService"
MAX_ATTEMPTS = 5  # gRPC caps a retry policy's maxAttempts at 5
INPUT_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))

T = TypeVar("T")


class EmbeddingError(UserError):
    """The server refused or failed a call; `code` is its `grpc.StatusCode`."""

    def __init__(self, code: grpc.StatusCode, message: str, method: str):
        super().__init__(f"{method}: {code.name}: {message}")
        self.code = code
        self.details = message
        self.method = method


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's retry policy for UNAVAILABLE and RESOURCE_EXHAUSTED, as a service config sets it.

    Before retry `n` (from 1) gRPC waits a uniform random time in [0, b], b = min(max_backoff,
    initial_backoff * multiplier**(n-1)): growing waits, spread so that clients refused
    together do not come back together. All attempts share the call's deadline.
    """

    max_attempts: int = MAX_ATTEMPTS  # first try included; 1 turns retries off
    initial_backoff: float = 0.05  # seconds
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self):
        if not 1 <= self.max_attempts <= MAX_ATTEMPTS:
            raise ValueError(
                f"max_attempts: expected 1..{MAX_ATTEMPTS} (gRPC's cap), got {self.max_attempts}"
            )
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError(
                f"backoff: expected 0 < initial_backoff <= max_backoff, got "
                f"{self.initial_backoff} and {self.max_backoff}"
            )
        if self.multiplier <= 0:
            raise ValueError(f"multiplier: expected > 0, got {self.multiplier}")

    def service_config(self) -> str:
        """The channel's service config: round_robin over the replicas, and this policy."""
        method: dict = {"name": [{"service": SERVICE}]}
        if self.max_attempts > 1:
            method["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff}s",
                "maxBackoff": f"{self.max_backoff}s",
                "backoffMultiplier": self.multiplier,
                "retryableStatusCodes": list(RETRYABLE_CODES),
            }
        return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]})


def channel_target(target: str | Sequence[str]) -> str:
    """The gRPC target for one address, a DNS name, or several replicas.

    A single `host:port` (or any gRPC target such as `dns:///name:port`) is kept: a name that
    resolves to several addresses gives one subchannel each. Several addresses (a list, or one
    string separated by commas) must be `ip:port` literals and become an `ipv4:`/`ipv6:`
    target; replicas with host names belong behind one DNS name.
    """
    addresses = [target] if isinstance(target, str) else list(target)
    addresses = [a.strip() for part in addresses for a in part.split(",") if a.strip()]
    if not addresses:
        raise UserError(f"target: expected host:port or a list of ip:port, got {target!r}")
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            families.add(ipaddress.ip_address(host.strip("[]")).version)
            if not port.isdigit():
                raise ValueError(port)
        except ValueError:
            raise UserError(
                f"target: several replicas must be given as ip:port literals, got {address!r}; "
                f"put replicas with host names behind one DNS name instead"
            ) from None
    if len(families) > 1:
        raise UserError(f"target: expected addresses of one IP family, got {addresses}")
    return f"ipv{families.pop()}:{','.join(addresses)}"


@dataclass(frozen=True)
class _ModelLimits:
    """What sizes the requests for one model version: rows per request, bytes per output row."""

    max_request_rows: int  # 0: the server sets no limit
    embedding_dim: int


@dataclass
class _Chunk:
    """One request's rows; `last` marks the final chunk of a caller's batch."""

    request_id: str
    rows: np.ndarray
    last: bool


def _read_pem(path: str | os.PathLike | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from exc


class EmbeddingClient:
    """A connection to an embedding server or its replicas, e.g.
    `EmbeddingClient("127.0.0.1:8500")`, `EmbeddingClient(["10.0.0.1:8500", "10.0.0.2:8500"])`
    or `EmbeddingClient("dns:///embed.svc.cluster.local:8500")`.

    `timeout` is the deadline in seconds of one request, retries included (a stream of k
    requests gets k times that); `retry` sets gRPC's retry policy. TLS is on when any of
    `root_cert`, `client_cert`/`client_key` (PEM files, mutual TLS) is given or `tls=True`
    (system roots); `tls_server_name` overrides the name checked against
    the server certificate. `token` is sent as `authorization: Bearer <token>`.
    `max_message_bytes` must not exceed the server's receive limit (gRPC's default: 4 MiB).
    Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = 30.0,
        token: str | None = None,
        tls: bool = False,
        root_cert: str | os.PathLike | None = None,
        client_cert: str | os.PathLike | None = None,
        client_key: str | os.PathLike | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        retry: RetryPolicy = RetryPolicy(),
    ):
        if (client_cert is None) != (client_key is None):
            raise UserError(
                "client_cert, client_key: expected both (mutual TLS) or neither, "
                f"got client_cert={client_cert} and client_key={client_key}"
            )
        if max_message_bytes <= _ENVELOPE_BYTES:
            raise UserError(
                f"max_message_bytes: expected more than {_ENVELOPE_BYTES}, got {max_message_bytes}"
            )
        self.target = channel_target(target)
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.retry = retry
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", retry.service_config()),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls or root_cert or client_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(root_cert, "TLS root certificate"),
                private_key=_read_pem(client_key, "TLS client key"),
                certificate_chain=_read_pem(client_cert, "TLS client certificate"),
            )
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.target, options=options)
        self._stub = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)
        self._limits: dict[tuple[str, int], _ModelLimits] = {}

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    # --- model information ---------------------------------------------------------------

    def list_models(self) -> list[embedding_pb2.ModelSummary]:
        """Every model on the server with its versions and their state."""
        response = self._unary(
            "ListModels", self._stub.ListModels, embedding_pb2.ListModelsRequest(), self.timeout
        )
        return list(response.models)

    def describe(self, model: str, version: int | None = None) -> embedding_pb2.ModelDescription:
        """Input and output specs, batching limits, provider and card of one model version."""
        return self._unary(
            "DescribeModel",
            self._stub.DescribeModel,
            embedding_pb2.DescribeModelRequest(model=model, version=version or 0),
            self.timeout,
        )

    # --- embeddings ------------------------------------------------------------------------

    def embed(
        self,
        array: np.ndarray,
        model: str,
        version: int | None = None,
        *,
        l2_normalize: bool = False,
        float16: bool = False,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Embeddings `(N, embedding_dim)` of `array` `(N, *input_shape)`, uint8 or float32.

        Float32 inputs are in the model's value range (`describe(model).input`). Returns
        float32, or float16 with `float16=True`; `timeout` overrides the client's per request.
        """
        _check_input(array)
        chunks = list(self._chunks([array], model, version))
        options = embedding_pb2.EmbedOptions(l2_normalize=l2_normalize, float16_output=float16)
        per_request = self.timeout if timeout is None else timeout
        if len(chunks) == 1:
            request = _request(model, version, chunks[0], options)
            response = self._unary("Embed", self._stub.Embed, request, per_request)
            return _embeddings(response, chunks[0], "Embed").copy()
        parts = self._stream(
            iter(chunks), model, version, options, deadline=per_request * len(chunks)
        )
        return np.concatenate(list(parts))

    def embed_batches(
        self,
        batches: Iterable[np.ndarray],
        model: str,
        version: int | None = None,
        *,
        l2_normalize: bool = False,
        float16: bool = False,
        timeout: float | None = None,
    ) -> Iterator[np.ndarray]:
        """Embeddings of each array of `batches`, in order, over one `EmbedStream`.

        `batches` is read lazily, so an extraction job never holds more than the requests in
        flight; `timeout` bounds the whole stream (None: no deadline). A broken stream is
        retried from its first unanswered request.
        """

        def checked(source: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
            for batch in source:
                _check_input(batch)
                yield batch

        options = embedding_pb2.EmbedOptions(l2_normalize=l2_normalize, float16_output=float16)
        chunks = self._chunks(checked(batches), model, version)
        return self._stream(chunks, model, version, options, deadline=timeout)

    # --- request sizing --------------------------------------------------------------------

    def _model_limits(self, model: str, version: int | None) -> _ModelLimits:
        key = (model, version or 0)
        if key not in self._limits:
            description = self.describe(model, version)
            self._limits[key] = _ModelLimits(
                description.batching.max_request_rows, description.embedding_dim
            )
        return self._limits[key]

    def rows_per_request(self, array: np.ndarray, model: str, version: int | None = None) -> int:
        """How many rows of `array` one request carries: under the message limit both ways
        and within the server's `max_request_rows`."""
        limits = self._model_limits(model, version)
        row_bytes = max(array[:1].nbytes, 4 * limits.embedding_dim)
        rows = (self.max_message_bytes - _ENVELOPE_BYTES) // max(row_bytes, 1)
        if rows < 1:
            raise UserError(
                f"max_message_bytes: one row of shape {array.shape[1:]} needs {row_bytes} bytes "
                f"plus {_ENVELOPE_BYTES} for the envelope, got a limit of {self.max_message_bytes}"
            )
        return min(rows, limits.max_request_rows) if limits.max_request_rows > 0 else rows

    def _chunks(
        self, batches: Iterable[np.ndarray], model: str, version: int | None
    ) -> Iterator[_Chunk]:
        ids = itertools.count()
        for batch in batches:
            step = self.rows_per_request(batch, model, version)
            for start in range(0, len(batch), step):
                yield _Chunk(
                    str(next(ids)), batch[start : start + step], last=start + step >= len(batch)
                )

    # --- calls ------------------------------------------------------------------------------

    def _unary(self, method: str, call: Callable[..., T], request, timeout: float | None) -> T:
        try:
            return call(request, timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise EmbeddingError(exc.code(), exc.details() or "", method) from None

    def _stream(
        self,
        chunks: Iterator[_Chunk],
        model: str,
        version: int | None,
        options: embedding_pb2.EmbedOptions,
        deadline: float | None,
    ) -> Iterator[np.ndarray]:
        """Send `chunks` over `EmbedStream`, yielding one array per caller batch, in order.

        Chunks sent but not yet answered wait in `unanswered`; `lock` guards the source, read
        by gRPC's sending thread and, at the end, here.
        """
        unanswered: deque[_Chunk] = deque()
        lock = threading.Lock()

        def requests() -> Iterator[embedding_pb2.EmbedRequest]:
            while True:
                with lock:
                    chunk = next(chunks, None)
                    if chunk is None:
                        return
                    unanswered.append(chunk)
                yield _request(model, version, chunk, options)

        parts: list[np.ndarray] = []
        call = self._stub.EmbedStream(requests(), timeout=deadline, metadata=self._metadata)
        try:
            for response in call:
                chunk = unanswered.popleft()
                parts.append(_embeddings(response, chunk, "EmbedStream"))
                if chunk.last:
                    yield parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
                    parts = []
            with lock:
                unsent = next(chunks, None) is not None
            if unanswered or unsent:
                raise EmbeddingError(
                    grpc.StatusCode.INTERNAL,
                    f"the server ended the stream with {len(unanswered)} requests unanswered"
                    f"{' and more unsent' if unsent else ''}",
                    "EmbedStream",
                )
        except grpc.RpcError as exc:
            raise EmbeddingError(exc.code(), exc.details() or "", "EmbedStream") from None
        finally:
            call.cancel()  # a consumer that stops early must not leave the stream open


def _check_input(array: np.ndarray) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"array: expected a numpy array, got {type(array).__name__}")
    if array.dtype not in INPUT_DTYPES:
        raise TypeError(f"array dtype: expected uint8 or float32, got {array.dtype}")
    if array.ndim < 2 or len(array) == 0:
        raise ValueError(f"array shape: expected (N >= 1, *input_shape), got {array.shape}")


def _request(
    model: str, version: int | None, chunk: _Chunk, options: embedding_pb2.EmbedOptions
) -> embedding_pb2.EmbedRequest:
    return embedding_pb2.EmbedRequest(
        model=model,
        version=version or 0,
        inputs=encode_tensor(chunk.rows),
        options=options,
        request_id=chunk.request_id,
    )


def _embeddings(response: embedding_pb2.EmbedResponse, chunk: _Chunk, method: str) -> np.ndarray:
    """The embeddings of `response`, checked against the request they answer."""
    if response.request_id != chunk.request_id:
        raise EmbeddingError(
            grpc.StatusCode.INTERNAL,
            f"response request_id: expected {chunk.request_id!r}, got {response.request_id!r}",
            method,
        )
    try:
        embeddings = decode_tensor(response.embeddings, "embeddings")
    except TensorCodecError as exc:
        raise EmbeddingError(grpc.StatusCode.INTERNAL, f"response {exc}", method) from None
    if embeddings.ndim != 2 or len(embeddings) != len(chunk.rows):
        raise EmbeddingError(
            grpc.StatusCode.INTERNAL,
            f"response embeddings.shape: expected "
            f"({len(chunk.rows)}, embedding_dim), got {embeddings.shape}",
            method,
        )
    return embeddings
