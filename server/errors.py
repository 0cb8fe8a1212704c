"""Serving errors, one class per gRPC status of DESIGN.md's error table, and the one mapping.

Services raise these (or let `TensorCodecError` through) and turn any exception into a status
with `grpc_status`; messages name the field, the expected and the received value.
"""

from __future__ import annotations

import logging
from typing import NoReturn

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


class Unavailable(ServingError):
    """The model failed to load, is still loading or draining, or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


def grpc_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message for any exception raised while serving a request.

    Unexpected exceptions become INTERNAL and are logged with their traceback.
    """
    if isinstance(exc, ServingError):
        return exc.code, str(exc)
    if isinstance(exc, TensorCodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    log.error("internal_error", exc_info=exc, extra={"error": f"{type(exc).__name__}: {exc}"})
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End the RPC with the status `grpc_status` gives for `exc`."""
    context.abort(*grpc_status(exc))  # raises: grpc ends the RPC here
