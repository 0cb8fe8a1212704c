"""Bearer tokens and TLS on a real gRPC server bound to 127.0.0.1.

The interceptor is first checked on grpc's own health and reflection services, so every path
(unary and bidirectional streaming, open and protected) runs through real grpc machinery; then
the whole server (KServe API, tokens, mutual TLS) end to end. A throwaway CA, server and client
certificates are made with the openssl command line.
"""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from kserve_harness import (
    MODEL,
    add_version,
    digits_pixels,
    expected_embeddings,
    kserve_request,
    kserve_stub,
    start_kserve_server,
)

from aet.server.auth import (
    LIVENESS_SERVICE,
    BearerTokenInterceptor,
    SecurityConfigError,
    read_tokens,
    tls_server_credentials,
)

TOKEN = "s3cret-token-0123456789"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


def _start(interceptors=(), credentials=None) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=interceptors)
    servicer = health.HealthServicer()
    servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)  # as aet serve does
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


@pytest.fixture
def token_server():
    """Health open (the default), reflection protected by TOKEN."""
    server, port = _start([BearerTokenInterceptor([TOKEN])])
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    server.stop(None)


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _list_services(channel: grpc.Channel, metadata=None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
    return [s.name for r in responses for s in r.list_services_response.service]


@pytest.mark.parametrize("service", ["", LIVENESS_SERVICE])
def test_readiness_and_liveness_stay_open_without_token(token_server, service):
    reply = health_pb2_grpc.HealthStub(token_server).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_per_service_health_and_health_watch_need_a_token(token_server):
    """FAULTS.md "Auth": only the overall Check is open; a named service's health would tell
    model names apart, and an open Watch would hold a stream slot without a token."""
    stub = health_pb2_grpc.HealthStub(token_server)
    for call in (
        lambda metadata: stub.Check(
            health_pb2.HealthCheckRequest(service="digits"), metadata=metadata, timeout=10
        ),
        lambda metadata: next(
            stub.Watch(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10)
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call(None)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "missing metadata 'authorization'" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:  # with a token: the health service answers
        stub.Check(health_pb2.HealthCheckRequest(service="digits"), metadata=_bearer(TOKEN))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    watched = stub.Watch(health_pb2.HealthCheckRequest(), metadata=_bearer(TOKEN), timeout=10)
    assert next(watched).status == health_pb2.HealthCheckResponse.SERVING
    watched.cancel()


def test_valid_token_passes_streaming_call(token_server):
    assert "grpc.health.v1.Health" in _list_services(token_server, _bearer(TOKEN))


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        (None, "missing metadata 'authorization'"),
        (_bearer("wrong-token"), "not one of the server's tokens"),
        ([("authorization", TOKEN)], "expected the scheme 'Bearer <token>'"),
        (_bearer(TOKEN[:-1]), "not one of the server's tokens"),
    ],
)
def test_bad_token_is_unauthenticated_and_never_echoed(token_server, metadata, fragment):
    with pytest.raises(grpc.RpcError) as caught:
        _list_services(token_server, metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fragment in caught.value.details()
    assert "wrong-token" not in caught.value.details() and TOKEN[:-1] not in caught.value.details()


def test_health_check_is_protected_when_health_is_not_open():
    server, port = _start([BearerTokenInterceptor([TOKEN], open_health=False)])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary(
                HEALTH_CHECK,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as caught:
                check(health_pb2.HealthCheckRequest(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reply = check(health_pb2.HealthCheckRequest(), metadata=_bearer(TOKEN), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(None)


def test_read_tokens_from_file_and_environment(tmp_path, monkeypatch):
    token_file = tmp_path / "tokens"
    token_file.write_text("# deploy tokens\nalpha-1\n\n  beta-2  \n")
    monkeypatch.setenv("AET_TEST_TOKEN", "gamma-3")
    assert read_tokens(token_file, "AET_TEST_TOKEN") == {"alpha-1", "beta-2", "gamma-3"}


@pytest.mark.parametrize(
    "content, env, fragment",
    [
        ("# only a comment\n", None, "expected at least one token"),
        (None, "", "got it unset or empty"),
        ("two words\n", None, "without spaces"),
    ],
)
def test_read_tokens_refuses_bad_sources(tmp_path, monkeypatch, content, env, fragment):
    token_file = None
    if content is not None:
        token_file = tmp_path / "tokens"
        token_file.write_text(content)
    if env is not None:
        monkeypatch.setenv("AET_TEST_TOKEN", env)
    with pytest.raises(SecurityConfigError, match=fragment):
        read_tokens(token_file, "AET_TEST_TOKEN" if env is not None else None)


def test_missing_token_file_is_named(tmp_path):
    with pytest.raises(SecurityConfigError, match=str(tmp_path / "absent")):
        read_tokens(tmp_path / "absent")


# --- TLS ---------------------------------------------------------------------------------------


def _check_health(port: int, credentials: grpc.ChannelCredentials) -> int:
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
        return (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(), timeout=10)
            .status
        )


def test_tls_serves_clients_that_trust_the_ca(pki):
    credentials = tls_server_credentials(pki / "server.pem", pki / "server.key")
    server, port = _start(credentials=credentials)
    try:
        trusted = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
        assert _check_health(port, trusted) == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(f"127.0.0.1:{port}") as plaintext:
            with pytest.raises(grpc.RpcError) as caught:
                health_pb2_grpc.HealthStub(plaintext).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_mutual_tls_requires_a_client_certificate(pki):
    credentials = tls_server_credentials(pki / "server.pem", pki / "server.key", pki / "ca.pem")
    server, port = _start(credentials=credentials)
    try:
        ca = (pki / "ca.pem").read_bytes()
        with_client_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes(),
        )
        assert _check_health(port, with_client_cert) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            _check_health(port, grpc.ssl_channel_credentials(root_certificates=ca))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(None)


def test_tls_files_are_checked_and_named(tmp_path, pki):
    not_pem = tmp_path / "server.pem"
    not_pem.write_bytes(b"\x00\x01binary")
    with pytest.raises(SecurityConfigError, match=f"TLS certificate {not_pem}: expected PEM"):
        tls_server_credentials(not_pem, pki / "server.key")
    with pytest.raises(SecurityConfigError, match="TLS client CA .*absent.pem: cannot read"):
        tls_server_credentials(pki / "server.pem", pki / "server.key", tmp_path / "absent.pem")


def test_kserve_server_over_mutual_tls_with_tokens(pki, tmp_path):
    """The whole server as `aet serve` wires it: mTLS, tokens on the APIs and per-model health,
    overall health open."""
    add_version(tmp_path, seed=5)
    live = start_kserve_server(
        tmp_path,
        tokens=(TOKEN,),
        tls_cert=pki / "server.pem",
        tls_key=pki / "server.key",
        tls_client_ca=pki / "ca.pem",
    )
    try:
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.pem").read_bytes(),
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes(),
        )
        with grpc.secure_channel(live.target, channel_credentials) as channel:
            health_reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=MODEL), metadata=_bearer(TOKEN), timeout=10
            )
            stub = kserve_stub(channel)
            pixels = digits_pixels(2)
            reply = stub.ModelInfer(kserve_request(pixels), metadata=_bearer(TOKEN), timeout=10)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(kserve_request(pixels), timeout=10)
    finally:
        live.stop()
    assert health_reply.status == health_pb2.HealthCheckResponse.SERVING
    np.testing.assert_allclose(
        np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, -1),
        expected_embeddings(pixels, seed=5),
        rtol=1e-5,
        atol=1e-5,
    )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
