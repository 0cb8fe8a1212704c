"""Transport security for the gRPC server: TLS credentials and bearer-token authentication.

Tokens travel in the request metadata as `authorization: Bearer <token>`. They come from a file
(one token per line; blank lines and `#` comments ignored) and/or an environment variable, are
compared in constant time (`hmac.compare_digest`) and never appear in a log or an error message.
The overall health check (`Health.Check` of service "", readiness) and liveness
(`LIVENESS_SERVICE`) stay open so that load balancers and orchestrators can probe without a
token; per-model health (it tells model names apart) and
`Health.Watch` (a stream: it would hold a slot that authenticated traffic needs) need one.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from aet.errors import UserError

AUTH_METADATA_KEY = "authorization"
BEARER_PREFIX = "bearer "
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
LIVENESS_SERVICE = "aet:live"  # health entry SERVING until exit (a model name has no ':')
OPEN_HEALTH_SERVICES = ("", LIVENESS_SERVICE)  # what probes may check without a token


class SecurityConfigError(UserError):
    """A token source or TLS file is missing, unreadable or malformed."""


def read_tokens(
    token_file: str | os.PathLike | None = None, token_env: str | None = None
) -> frozenset[str]:
    """Collect the accepted tokens from `token_file` and the environment variable `token_env`.

    Raises `SecurityConfigError` naming the file or variable when a named source is missing,
    unreadable or holds no token.
    """
    tokens: set[str] = set()
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SecurityConfigError(f"token file {token_file}: cannot read it: {exc}") from exc
        from_file = {
            line.strip()
            for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")
        }
        if not from_file:
            raise SecurityConfigError(
                f"token file {token_file}: expected at least one token (one per line), got none"
            )
        tokens |= from_file
    if token_env is not None:
        value = os.environ.get(token_env, "").strip()
        if not value:
            raise SecurityConfigError(
                f"environment variable {token_env}: expected a bearer token, got it unset or empty"
            )
        tokens.add(value)
    for token in tokens:
        if any(ch.isspace() for ch in token) or not token.isprintable():
            raise SecurityConfigError(
                "bearer tokens: expected printable characters without spaces, got a token "
                f"of {len(token)} characters that has some"
            )
    return frozenset(tokens)


class TokenCheck:
    """Whether an `authorization` value carries one of the accepted bearer tokens."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = tuple(token.encode("utf-8") for token in tokens)
        if not self._tokens:
            raise SecurityConfigError("bearer tokens: expected at least one token, got none")

    def refusal(self, value: str | bytes | None) -> str | None:
        """None when `value` is 'Bearer <accepted token>', else the reason (never the token)."""
        if value is None:
            return (
                f"missing metadata {AUTH_METADATA_KEY!r}: expected "
                f"'{AUTH_METADATA_KEY}: Bearer <token>', got no such key"
            )
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        if not value.lower().startswith(BEARER_PREFIX):
            return (
                f"metadata {AUTH_METADATA_KEY!r}: expected the scheme 'Bearer <token>', "
                f"got a value without it"
            )
        presented = value[len(BEARER_PREFIX) :].strip().encode("utf-8")
        # Compare with every token, always, so the time taken does not reveal which one matched.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        if matched:
            return None
        return f"metadata {AUTH_METADATA_KEY!r}: the bearer token is not one of the server's tokens"


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse calls without a valid `authorization: Bearer <token>` with UNAUTHENTICATED.

    With `open_health` (the default) the overall health check (`Health.Check`, service "")
    passes without a token; a check of a named service is refused after its request is read.
    Any other refused call's body is never parsed: whatever it holds, the answer is
    UNAUTHENTICATED.
    """

    def __init__(self, tokens: Iterable[str], open_health: bool = True):
        self.check = TokenCheck(tokens)
        self.open_health = open_health

    def intercept_service(self, continuation, handler_call_details):
        values = [
            value
            for key, value in handler_call_details.invocation_metadata or ()
            if key == AUTH_METADATA_KEY
        ]
        refusal = self.check.refusal(values[0] if values else None)
        if refusal is None:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if self.open_health and handler_call_details.method == HEALTH_CHECK:
            return _overall_health_only(handler, refusal)
        return _refusing_handler(handler, refusal)


def _overall_health_only(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """`Health.Check` without a token: answered for the overall service "" and liveness."""

    def check(request, context):
        if request.service not in OPEN_HEALTH_SERVICES:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f'{reason}; only the overall health (service "") and liveness '
                f"({LIVENESS_SERVICE!r}) are open without a token",
            )
        return handler.unary_unary(request, context)

    return grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _refusing_handler(handler: grpc.RpcMethodHandler, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that aborts with UNAUTHENTICATED,
    taking the request as raw bytes (no deserializer: a garbage body is not parsed)."""

    def refuse(_request_or_iterator, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    factories: dict[tuple[bool, bool], Callable] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    kind = (handler.request_streaming, handler.response_streaming)
    return factories[kind](refuse, response_serializer=handler.response_serializer)


def _read_pem(path: str | os.PathLike, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"{what} {path}: cannot read it: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(
            f"{what} {path}: expected PEM text ('-----BEGIN ...'), got {len(data)} bytes without it"
        )
    return data


def tls_server_credentials(
    cert_file: str | os.PathLike,
    key_file: str | os.PathLike,
    client_ca_file: str | os.PathLike | None = None,
) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with `client_ca_file`, clients must present a certificate
    signed by that CA (mutual TLS)."""
    certificate = _read_pem(cert_file, "TLS certificate")
    private_key = _read_pem(key_file, "TLS private key")
    client_ca = None if client_ca_file is None else _read_pem(client_ca_file, "TLS client CA")
    return grpc.ssl_server_credentials(
        [(private_key, certificate)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
