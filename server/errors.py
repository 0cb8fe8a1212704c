"""Serving errors, one class per gRPC status of DESIGN.md's error table, and the one mapping.

Services raise these (or let `TensorCodecError` through); `@maps_errors` on a servicer method
turns any exception into its status at the edge (`grpc_status`). Messages name the field, the
expected and the received value; a client-supplied string appears only as a bounded `excerpt`,
and every message is cut to `MAX_MESSAGE_CHARS` (a status message travels in the trailing
metadata, whose size is limited: an unbounded echo would turn into RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import TypeVar

import grpc

from aet.proto.codec import TensorCodecError

log = logging.getLogger(__name__)


class ServingError(Exception):
    """A request the server answers with `code` and this message."""

    code = grpc.StatusCode.INTERNAL


class NotFound(ServingError):
    """Unknown model or version."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ServingError):
    """Wrong shape, dtype, byte length, NaN/Inf, empty batch or a batch over the limit."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhausted(ServingError):
    """The model's queue is full; the client may retry."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ServingError):
    """The client's deadline passed before the request's batch ran; the work was dropped."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    """The client cancelled before the request's batch ran; the work was dropped."""

    code = grpc.StatusCode.CANCELLED


class Unauthenticated(ServingError):
    """Missing or wrong token while authentication is on."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServingError):
    """A call the caller's token does not allow (model control without an admin token)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ServingError):
    """The model failed to load, is still loading or draining, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


EXCERPT_CHARS = 64  # characters of a client-supplied string quoted in a message
MAX_MESSAGE_CHARS = 1024  # longest status message sent


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """`repr(value)`, cut to about `limit` characters with its full length said when cut."""
    shown = repr(value)
    if len(shown) <= limit:
        return shown
    size = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{shown[:limit]}...{size}"


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code of an exception raised while serving a request."""
    if isinstance(exc, ServingError):
        return exc.code
    if isinstance(exc, TensorCodecError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and (bounded) message for an exception raised serving a request.

    Unexpected exceptions become INTERNAL and are logged with their traceback.
    """
    code = status_code(exc)
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, ServingError):
        log.error("internal_error", exc_info=exc, extra={"error": f"{type(exc).__name__}: {exc}"})
        message = f"internal error: {type(exc).__name__}: {exc}"
    else:
        message = str(exc)
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return code, message


def with_prefix(exc: BaseException, prefix: str) -> ServingError:
    """`exc` as a `ServingError` of the same status whose message starts with `prefix`."""
    code, message = grpc_status(exc)
    error = ServingError(f"{prefix}: {message}")
    error.code = code
    return error


Method = TypeVar("Method", bound=Callable)


def maps_errors(method: Method) -> Method:
    """Servicer method decorator: any exception ends the call with its `grpc_status`.

    Works on unary methods and on response-streaming (generator) methods alike.
    """
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:
                context.abort(*grpc_status(exc))

        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            context.abort(*grpc_status(exc))

    return unary  # type: ignore[return-value]
