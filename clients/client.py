"""`EmbeddingClient`: embeddings from an `aet serve` server over gRPC (`aet.v1.EmbeddingService`).

Arrays of any length are cut into requests that fit under the gRPC message limit and the
server's `max_request_rows`; one request goes as a unary `Embed`, more as one `EmbedStream`.
UNAVAILABLE and RESOURCE_EXHAUSTED are retried with exponential backoff and jitter (a broken
stream resumes from its first unanswered request); every other failure raises `EmbeddingError`
at once, carrying the gRPC status code and the server's message.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from aet.errors import UserError
from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto.codec import TensorCodecError, decode_tensor, encode_tensor
from aet.server.classification import Classification

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # gRPC's default receive limit, on both sides
# Room for everything in a request or response besides the tensor bytes (names, shape, ids).
_ENVELOPE_BYTES = 4096
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
_MESSAGE_TOO_LARGE = "larger than max"  # gRPC core's words for a message over the limit
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
    """Exponential backoff with jitter for UNAVAILABLE and RESOURCE_EXHAUSTED.

    Retry `n` (from 0) waits a uniform random time in [b/2, b], b = min(max_backoff,
    initial_backoff * multiplier**n): growing waits, spread so that clients refused together
    do not come back together.
    """

    max_attempts: int = 6  # first try included
    initial_backoff: float = 0.05  # seconds
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts: expected >= 1, got {self.max_attempts}")
        if not 0 < self.initial_backoff <= self.max_backoff:
            raise ValueError(
                f"backoff: expected 0 < initial_backoff <= max_backoff, got "
                f"{self.initial_backoff} and {self.max_backoff}"
            )

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry number `retry` (0 for the first retry)."""
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        return rng.uniform(ceiling / 2, ceiling)


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
    """A connection to one embedding server, e.g. `EmbeddingClient("127.0.0.1:8500")`.

    `timeout` is the deadline in seconds of one request (a stream of k requests gets k times
    that). TLS is on when any of `root_cert`, `client_cert`/`client_key` (PEM files, mutual TLS)
    is given or `tls=True` (system roots); `tls_server_name` overrides the name checked against
    the server certificate. `token` is sent as `authorization: Bearer <token>`.
    `max_message_bytes` must not exceed the server's receive limit (gRPC's default: 4 MiB).
    Use as a context manager, or call `close()`.
    """

    def __init__(
        self,
        target: str,
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
        seed: int | None = None,
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
        self.target = target
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self.retry = retry
        self._rng = random.Random(seed)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls or root_cert or client_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(root_cert, "TLS root certificate"),
                private_key=_read_pem(client_key, "TLS client key"),
                certificate_chain=_read_pem(client_cert, "TLS client certificate"),
            )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
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

    def classify(
        self,
        array: np.ndarray,
        model: str,
        version: int | None = None,
        *,
        top_k: int = 1,
        timeout: float | None = None,
    ) -> Classification:
        """Class probabilities and the `top_k` classes of `array` `(N, *input_shape)` from a
        classifier model (`aet head`), one `Classify` call per request-sized chunk.

        Returns a `Classification`: `probabilities` (N, K) float32, and `indices`, `scores`
        and `labels` (N, top_k), most probable class first.
        """
        _check_input(array)
        per_request = self.timeout if timeout is None else timeout
        parts = []
        for chunk in self._chunks([array], model, version):
            request = embedding_pb2.ClassifyRequest(
                model=model,
                version=version or 0,
                inputs=encode_tensor(chunk.rows),
                top_k=top_k,
                request_id=chunk.request_id,
            )
            response = self._unary("Classify", self._stub.Classify, request, per_request)
            parts.append(_classification(response, chunk))
        return Classification(
            *(np.concatenate([getattr(part, name) for part in parts]) for name in _FIELDS)
        )

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

    # --- calls with retries ----------------------------------------------------------------

    def _backoff(self, method: str, exc: grpc.RpcError, retry: int) -> None:
        """Sleep before retry number `retry`, or raise `EmbeddingError` if `exc` is final."""
        code = exc.code()
        # gRPC reports a message over the receiver's limit as RESOURCE_EXHAUSTED too; sending
        # it again cannot help (lower max_message_bytes instead).
        too_large = _MESSAGE_TOO_LARGE in (exc.details() or "")
        if code not in RETRYABLE_CODES or too_large or retry + 1 >= self.retry.max_attempts:
            raise EmbeddingError(code, exc.details() or "", method) from None
        delay = self.retry.delay(retry, self._rng)
        log.warning(
            "%s to %s: %s (%s); retry %d of %d in %.3f s",
            method,
            self.target,
            code.name,
            exc.details(),
            retry + 1,
            self.retry.max_attempts - 1,
            delay,
        )
        time.sleep(delay)

    def _unary(self, method: str, call: Callable[..., T], request, timeout: float | None) -> T:
        retry = 0
        while True:
            try:
                return call(request, timeout=timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                self._backoff(method, exc, retry)
                retry += 1

    def _stream(
        self,
        chunks: Iterator[_Chunk],
        model: str,
        version: int | None,
        options: embedding_pb2.EmbedOptions,
        deadline: float | None,
    ) -> Iterator[np.ndarray]:
        """Send `chunks` over `EmbedStream`, yielding one array per caller batch, in order.

        Chunks sent but not yet answered wait in `unanswered`; after a retryable failure a new
        stream sends those again before reading on. `lock` and `generation` keep a stream the
        client gave up on from taking more chunks from the source.
        """
        unanswered: deque[_Chunk] = deque()
        lock = threading.Lock()
        generation = 0

        def requests(own_generation: int) -> Iterator[embedding_pb2.EmbedRequest]:
            with lock:
                resend = list(unanswered)
            for chunk in resend:
                yield _request(model, version, chunk, options)
            while True:
                with lock:
                    if own_generation != generation:
                        return
                    chunk = next(chunks, None)
                    if chunk is None:
                        return
                    unanswered.append(chunk)
                yield _request(model, version, chunk, options)

        parts: list[np.ndarray] = []
        retry = 0
        while True:
            call = self._stub.EmbedStream(
                requests(generation), timeout=deadline, metadata=self._metadata
            )
            try:
                for response in call:
                    chunk = unanswered.popleft()
                    parts.append(_embeddings(response, chunk, "EmbedStream"))
                    retry = 0  # the stream is making progress: start the backoff afresh
                    if chunk.last:
                        yield parts[0].copy() if len(parts) == 1 else np.concatenate(parts)
                        parts = []
                with lock:
                    unsent = next(chunks, None) is not None
                if unanswered or unsent:
                    raise EmbeddingError(
                        grpc.StatusCode.INTERNAL,
                        f"the server ended the stream "
                        f"with {len(unanswered)} requests unanswered"
                        f"{' and more unsent' if unsent else ''}",
                        "EmbedStream",
                    )
                return
            except grpc.RpcError as exc:
                with lock:
                    generation += 1
                call.cancel()
                self._backoff("EmbedStream", exc, retry)
                retry += 1
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


_FIELDS = ("probabilities", "indices", "scores", "labels")


def _classification(response: embedding_pb2.ClassifyResponse, chunk: _Chunk) -> Classification:
    """The probabilities and top classes of `response`, checked against its request."""
    method = "Classify"
    if response.request_id != chunk.request_id:
        raise EmbeddingError(
            grpc.StatusCode.INTERNAL,
            f"response request_id: expected {chunk.request_id!r}, got {response.request_id!r}",
            method,
        )
    try:
        probabilities = decode_tensor(response.probabilities, "probabilities")
    except TensorCodecError as exc:
        raise EmbeddingError(grpc.StatusCode.INTERNAL, f"response {exc}", method) from None
    rows = len(chunk.rows)
    if probabilities.ndim != 2 or len(probabilities) != rows or len(response.top) != rows:
        raise EmbeddingError(
            grpc.StatusCode.INTERNAL,
            f"response: expected probabilities ({rows}, classes) and {rows} top entries, got "
            f"{probabilities.shape} and {len(response.top)}",
            method,
        )
    return Classification(
        probabilities,
        np.array([list(top.indices) for top in response.top], dtype=np.int64),
        np.array([list(top.scores) for top in response.top], dtype=np.float32),
        np.array([list(top.labels) for top in response.top], dtype=str),
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
