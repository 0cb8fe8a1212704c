"""`EmbeddingClient`: embeddings from an `aet serve` server over gRPC (`aet.v1.EmbeddingService`).

Arrays of any length are cut into requests that fit under the gRPC message limit and the
server's `max_request_rows`; one request goes as a unary `Embed`, more as one `EmbedStream`.

The client talks to one server or to replicas of it: a list of addresses, or a DNS name that
resolves to several, balanced per call by gRPC's `round_robin` policy. Retries are gRPC's own,
set in the channel's service config: UNAVAILABLE and RESOURCE_EXHAUSTED are retried with
exponential backoff and jitter, on whichever replica the policy picks next, all attempts
within the call's one deadline. Every other failure, and a stream broken after it answered,
raises `EmbeddingError` carrying the gRPC status code and the server's message.

`list_models` and `describe` return plain dataclasses (`ModelSummary`, `ModelInfo`). Request
sizes come from the description of the version that answers: "latest" is re-resolved when a
response comes from another version or the rows do not fit the cached input shape, so a client
follows hot reloads.
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

from aet.conformal import P_VALUE_NAME
from aet.errors import UserError
from aet.proto import embedding_pb2, embedding_pb2_grpc
from aet.proto.codec import TensorCodecError, decode_tensor, dtype_name, encode_tensor
from aet.repository import SCORE_NAME
from aet.server.classification import Classification

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

    def __post_init__(self) -> None:
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
class VersionState:
    """One version of a model on the server: `state` is LOADING, READY, DRAINING or FAILED."""

    version: int
    state: str
    reason: str  # why it is not READY; empty when it is


@dataclass(frozen=True)
class ModelSummary:
    """One model on the server (`EmbeddingClient.list_models`)."""

    name: str
    latest_version: int  # highest READY version, 0 when none is ready
    versions: tuple[VersionState, ...]


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: shape without the batch axis, dtypes, value range."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32", "uint8" or "float16"
    accepted_dtypes: tuple[str, ...]  # what a request may send (inputs)
    min_value: float  # the value range the graph expects (inputs; 0 for outputs)
    max_value: float


@dataclass(frozen=True)
class BatchingInfo:
    """The server's batching limits for one model version."""

    max_batch_size: int
    max_queue_delay_ms: float
    max_queue_size: int
    max_request_rows: int  # 0: no limit
    dynamic_batching: bool


@dataclass(frozen=True)
class ModelInfo:
    """One model version as the server describes it (`EmbeddingClient.describe`)."""

    name: str
    version: int
    versions: tuple[VersionState, ...]
    input: TensorInfo
    output: TensorInfo
    embedding_dim: int
    execution_provider: str
    batching: BatchingInfo
    sha256: str
    card: dict  # the full model.json
    class_labels: tuple[str, ...] = ()  # a classifier's class names by output column


def _version_states(
    versions: Iterable[embedding_pb2.ModelVersionState],
) -> tuple[VersionState, ...]:
    return tuple(
        VersionState(int(v.version), embedding_pb2.ModelVersionState.State.Name(v.state), v.reason)
        for v in versions
    )


def _tensor_info(spec: embedding_pb2.TensorSpec) -> TensorInfo:
    return TensorInfo(
        name=spec.name,
        shape=tuple(int(d) for d in spec.shape),
        dtype=dtype_name(spec.dtype).lower(),
        accepted_dtypes=tuple(dtype_name(d).lower() for d in spec.accepted_dtypes),
        min_value=spec.min_value,
        max_value=spec.max_value,
    )


def _model_info(description: embedding_pb2.ModelDescription) -> ModelInfo:
    batching = description.batching
    return ModelInfo(
        name=description.name,
        version=int(description.version),
        versions=_version_states(description.versions),
        input=_tensor_info(description.input),
        output=_tensor_info(description.output),
        embedding_dim=int(description.embedding_dim),
        execution_provider=description.execution_provider,
        batching=BatchingInfo(
            int(batching.max_batch_size),
            batching.max_queue_delay_ms,
            int(batching.max_queue_size),
            int(batching.max_request_rows),
            batching.dynamic_batching,
        ),
        sha256=description.sha256,
        card=json.loads(description.model_card_json) if description.model_card_json else {},
        class_labels=tuple(description.class_labels),
    )


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
        options: list[tuple[str, int | str]] = [
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
        # Descriptions by (model, resolved version), and the version "latest" resolved to last:
        # a hot reload moves "latest", and the next call describes the new version.
        self._described: dict[tuple[str, int], ModelInfo] = {}
        self._latest: dict[str, int] = {}
        self._cache_lock = threading.Lock()

    def __enter__(self) -> EmbeddingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._channel.close()

    # --- model information ---------------------------------------------------------------

    def list_models(self) -> list[ModelSummary]:
        """Every model on the server with its versions and their state."""
        response = self._unary(
            "ListModels", self._stub.ListModels, embedding_pb2.ListModelsRequest(), self.timeout
        )
        return [
            ModelSummary(m.name, int(m.latest_version), _version_states(m.versions))
            for m in response.models
        ]

    def describe(self, model: str, version: int | None = None) -> ModelInfo:
        """Input and output specs, batching limits, provider and card of one model version
        (`version` None: the latest ready one)."""
        description = _model_info(
            self._unary(
                "DescribeModel",
                self._stub.DescribeModel,
                embedding_pb2.DescribeModelRequest(model=model, version=version or 0),
                self.timeout,
            )
        )
        with self._cache_lock:
            self._described[(model, description.version)] = description
            if version is None:
                self._latest[model] = description.version
        return description

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
        """Embeddings of `array`.

        Parameters
        ----------
        array : ndarray of shape (N, *input_shape)
            Values in the model's range (`describe(model).input`). uint8 and float32 go as
            they are; other real dtypes are cast to uint8 or float32 where no value changes
            (TypeError otherwise).
        model : str
        version : int, optional
            Default: the latest ready version, followed across hot reloads.
        l2_normalize, float16 : bool
            Unit-length rows; float16 output.
        timeout : float, optional
            Overrides the client's per-request deadline.

        Returns
        -------
        ndarray of shape (N, embedding_dim), float32 (float16 with `float16=True`)
        """
        options = embedding_pb2.EmbedOptions(l2_normalize=l2_normalize, float16_output=float16)
        return self._embed(array, model, version, options, timeout, _embeddings)

    def embed_with_score(
        self,
        array: np.ndarray,
        model: str,
        version: int | None = None,
        *,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings of `array` and each row's novelty score, `reconstruction_error`: the
        reconstruction error in the model's likelihood terms (higher is more unusual). The
        model card's `score.percentiles` (validation split) tell how unusual.

        Returns
        -------
        (ndarray of shape (N, embedding_dim), ndarray of shape (N,)), float32
        """
        embeddings, scores = self._embed_scored(array, model, version, timeout, (SCORE_NAME,))
        return embeddings, scores

    def embed_with_p_value(
        self,
        array: np.ndarray,
        model: str,
        version: int | None = None,
        *,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As `embed_with_score`, and each row's conformal p-value (`EmbedOptions.p_value`),
        which the server computes from the score against the version's calibration scores
        (`aet.conformal.p_values`); a version without them answers INVALID_ARGUMENT.

        Returns
        -------
        (ndarray (N, embedding_dim), ndarray (N,), ndarray (N,) in (0, 1]), float32
        """
        embeddings, scores, p = self._embed_scored(
            array, model, version, timeout, (SCORE_NAME, P_VALUE_NAME)
        )
        return embeddings, scores, p

    def _embed_scored(
        self,
        array: np.ndarray,
        model: str,
        version: int | None,
        timeout: float | None,
        names: tuple[str, ...],
    ) -> list[np.ndarray]:
        """The embeddings of `array`, then each per-row output of `names` (the score, and
        the p-value when named)."""
        options = embedding_pb2.EmbedOptions(
            reconstruction_error=True, p_value=P_VALUE_NAME in names
        )
        packed = self._embed(array, model, version, options, timeout, _with_columns(names))
        width = packed.shape[1] - len(names)
        return [packed[:, :width], *(packed[:, width + i] for i in range(len(names)))]

    def _embed(
        self,
        array: np.ndarray,
        model: str,
        version: int | None,
        options: embedding_pb2.EmbedOptions,
        timeout: float | None,
        read: Callable[[embedding_pb2.EmbedResponse, _Chunk, str], np.ndarray],
    ) -> np.ndarray:
        """`read` applied to the responses of `array`'s requests (one, or a stream), joined."""
        chunks = list(self._chunks([self._wire_array(array, model, version)], model, version))
        per_request = self.timeout if timeout is None else timeout
        if len(chunks) == 1:
            request = _request(model, version, chunks[0], options)
            response = self._unary("Embed", self._stub.Embed, request, per_request)
            self._follow_latest(model, version, response.version)
            return read(response, chunks[0], "Embed").copy()
        parts = self._stream(
            iter(chunks), model, version, options, deadline=per_request * len(chunks), read=read
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
        with_score: bool = False,
    ) -> Iterator[np.ndarray]:
        """Embeddings of each array of `batches`, in order, over one `EmbedStream`.

        `batches` is read lazily, so an extraction job never holds more than the requests in
        flight; `timeout` bounds the whole stream (None: no deadline). A broken stream is
        retried from its first unanswered request. With `with_score` each array carries the
        rows' novelty scores as one more last column: (rows, embedding_dim + 1).
        """

        def checked(source: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
            for batch in source:
                yield self._wire_array(batch, model, version)

        options = embedding_pb2.EmbedOptions(
            l2_normalize=l2_normalize, float16_output=float16, reconstruction_error=with_score
        )
        chunks = self._chunks(checked(batches), model, version)
        read = _with_columns((SCORE_NAME,)) if with_score else _embeddings
        return self._stream(chunks, model, version, options, deadline=timeout, read=read)

    def classify(
        self,
        array: np.ndarray,
        model: str,
        version: int | None = None,
        *,
        top_k: int = 1,
        timeout: float | None = None,
    ) -> Classification:
        """Class probabilities and the top classes of `array` from a classifier model
        (`aet head`), one `Classify` call per request-sized chunk.

        Parameters
        ----------
        array : ndarray of shape (N, *input_shape)
            As for `embed`.
        model : str
        version : int, optional
            Default: the latest ready version, followed across hot reloads.
        top_k : int
            Classes per row, 1 to the number of classes K.
        timeout : float, optional
            Overrides the client's per-request deadline.

        Returns
        -------
        Classification
            `probabilities` (N, K) float32; `indices`, `scores` and `labels` (N, top_k), most
            probable class first.
        """
        array = self._wire_array(array, model, version)
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
            self._follow_latest(model, version, response.version)
            parts.append(_classification(response, chunk))
        return Classification(
            *(np.concatenate([getattr(part, name) for part in parts]) for name in _FIELDS)
        )

    # --- request sizing --------------------------------------------------------------------

    def _model_info(self, model: str, version: int | None, rows: np.ndarray) -> ModelInfo:
        """The description requests for `rows` are sized and cast by: that of `version`, or of
        the version "latest" last resolved to, described afresh when `rows` do not fit it."""
        with self._cache_lock:
            resolved = version or self._latest.get(model)
            known = self._described.get((model, resolved)) if resolved else None
        if known is not None and (version or rows.shape[1:] == known.input.shape):
            return known
        return self.describe(model, version)

    def _follow_latest(self, model: str, version: int | None, answered: int) -> None:
        """Record the version a "latest" request was answered by (it moves on hot reloads)."""
        if version is None and answered:
            with self._cache_lock:
                self._latest[model] = answered

    def rows_per_request(self, array: np.ndarray, model: str, version: int | None = None) -> int:
        """How many rows of `array` one request carries: under the message limit both ways
        and within the server's `max_request_rows`."""
        info = self._model_info(model, version, array)
        row_bytes = max(array[:1].nbytes, 4 * info.embedding_dim)
        rows = (self.max_message_bytes - _ENVELOPE_BYTES) // max(row_bytes, 1)
        if rows < 1:
            raise UserError(
                f"max_message_bytes: one row of shape {array.shape[1:]} needs {row_bytes} bytes "
                f"plus {_ENVELOPE_BYTES} for the envelope, got a limit of {self.max_message_bytes}"
            )
        limit = info.batching.max_request_rows
        return min(rows, limit) if limit > 0 else rows

    def _wire_array(self, array: np.ndarray, model: str, version: int | None) -> np.ndarray:
        """`array` checked, and cast to a dtype the model accepts where no value changes."""
        _check_input(array)
        if array.dtype in INPUT_DTYPES:
            return array
        info = self._model_info(model, version, array)
        return lossless_cast(array, accept_uint8="uint8" in info.input.accepted_dtypes)

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

    def _unary(
        self, method: str, call: Callable[..., T], request: object, timeout: float | None
    ) -> T:
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
        read: Callable[..., np.ndarray] | None = None,
    ) -> Iterator[np.ndarray]:
        """Send `chunks` over `EmbedStream`, yielding one array per caller batch, in order
        (`read` takes each response apart; default: its embeddings).

        Chunks sent but not yet answered wait in `unanswered`; `lock` guards the source, read
        by gRPC's sending thread and, at the end, here.
        """
        unanswered: deque[_Chunk] = deque()
        lock = threading.Lock()

        def requests() -> Iterator[embedding_pb2.EmbedRequest]:
            while True:
                with lock:
                    pending = next(chunks, None)
                    if pending is None:
                        return
                    unanswered.append(pending)
                yield _request(model, version, pending, options)

        parts: list[np.ndarray] = []
        call = self._stub.EmbedStream(requests(), timeout=deadline, metadata=self._metadata)
        try:
            for response in call:
                chunk = unanswered.popleft()
                self._follow_latest(model, version, response.version)
                parts.append((read or _embeddings)(response, chunk, "EmbedStream"))
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
    if array.ndim < 2 or len(array) == 0:
        raise ValueError(f"array shape: expected (N >= 1, *input_shape), got {array.shape}")


def lossless_cast(array: np.ndarray, accept_uint8: bool) -> np.ndarray:
    """`array` as uint8 (when `accept_uint8` and every value is an integer in 0..255) or as
    float32 (when every value survives the cast); TypeError otherwise, naming the dtype."""
    kind = array.dtype.kind
    if kind not in "biuf":
        raise TypeError(
            f"array dtype: expected uint8, float32 or another real dtype, got {array.dtype}"
        )
    if accept_uint8 and kind in "biu" and array.min() >= 0 and array.max() <= 255:
        return array.astype(np.uint8)
    as_float = array.astype(np.float32)
    same = as_float == array if kind != "f" else (as_float == array) | np.isnan(array)
    if not same.all():
        where = tuple(int(i) for i in np.argwhere(~same)[0])
        raise TypeError(
            f"array dtype {array.dtype}: expected values that float32 holds exactly, got "
            f"{int((~same).sum())} that it does not (first: {array[where]!r} at {where} would "
            f"become {as_float[where]!r}); pass array.astype(np.float32) to accept the rounding"
        )
    return as_float


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


def _response_tensor(
    response: embedding_pb2.EmbedResponse | embedding_pb2.ClassifyResponse,
    field: str,
    chunk: _Chunk,
    method: str,
) -> np.ndarray:
    """The tensor `field` of `response`, once its request_id is checked against `chunk`'s."""
    if response.request_id != chunk.request_id:
        raise EmbeddingError(
            grpc.StatusCode.INTERNAL,
            f"response request_id: expected {chunk.request_id!r}, got {response.request_id!r}",
            method,
        )
    try:
        return decode_tensor(getattr(response, field), field)
    except TensorCodecError as exc:
        raise EmbeddingError(grpc.StatusCode.INTERNAL, f"response {exc}", method) from None


def _classification(response: embedding_pb2.ClassifyResponse, chunk: _Chunk) -> Classification:
    """The probabilities and top classes of `response`, checked against its request."""
    method = "Classify"
    probabilities = _response_tensor(response, "probabilities", chunk, method)
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
    embeddings = _response_tensor(response, "embeddings", chunk, method)
    if embeddings.ndim != 2 or len(embeddings) != len(chunk.rows):
        raise EmbeddingError(
            grpc.StatusCode.INTERNAL,
            f"response embeddings.shape: expected "
            f"({len(chunk.rows)}, embedding_dim), got {embeddings.shape}",
            method,
        )
    return embeddings


def _with_columns(
    names: tuple[str, ...],
) -> Callable[[embedding_pb2.EmbedResponse, _Chunk, str], np.ndarray]:
    """A reader of the embeddings of a response with its per-row tensors `names` (fields of
    `EmbedResponse`, e.g. the score) as more columns: (rows, dim + len(names))."""

    def read(response: embedding_pb2.EmbedResponse, chunk: _Chunk, method: str) -> np.ndarray:
        embeddings = _embeddings(response, chunk, method)
        columns = [embeddings.astype(np.float32)]
        for name in names:
            try:
                column = decode_tensor(getattr(response, name), name)
            except TensorCodecError as exc:
                raise EmbeddingError(grpc.StatusCode.INTERNAL, f"response {exc}", method) from None
            if column.shape != (len(embeddings),):
                raise EmbeddingError(
                    grpc.StatusCode.INTERNAL,
                    f"response {name}.shape: expected ({len(embeddings)},), got {column.shape}",
                    method,
                )
            columns.append(column[:, None])
        return np.concatenate(columns, axis=1)

    return read
