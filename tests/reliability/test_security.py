"""TLS, mutual TLS, bearer tokens and per-caller rate limits, end to end.

Each test starts a real gateway process (own ports, own settings) in front of the session
stack's preprocess service and Triton, with certificates generated here.
"""
from __future__ import annotations

import signal
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from shopvision.v1 import recognition_pb2, recognition_pb2_grpc

from devstack.stack import Ports, Stack
from services.common.config import ConfigError
from services.gateway.config import GatewayConfig
from tests.conftest import photo_bytes
from tests.metrics_util import scrape, value
from tests.reliability.certs import CertificateAuthority
from tests.reliability.processes import Service, start_gateway

ALICE = "alice-0123456789abcdef0123456789"
BOB = "bob-fedcba9876543210fedcba98765"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "shopvision-test-ca")
    rogue = CertificateAuthority(directory, "rogue-ca")
    return {"ca": ca, "server": ca.issue("gateway", server=True), "client": ca.issue("checkout-service", server=False),
            "rogue_client": rogue.issue("intruder", server=False)}


@pytest.fixture(scope="module")
def tls_gateway(stack: Stack, pki: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """TLS (server-authenticated) + bearer tokens for two callers + a per-caller rate limit."""
    directory = tmp_path_factory.mktemp("tls-gateway")
    tokens = directory / "tokens"
    tokens.write_text(f"# caller token\nalice {ALICE}\nbob {BOB}\n")
    service = start_gateway(stack, directory / "gateway.log", GATEWAY_TLS_CERT=str(pki["server"].cert),
                            GATEWAY_TLS_KEY=str(pki["server"].key), GATEWAY_AUTH_TOKENS_FILE=str(tokens),
                            GATEWAY_RATE_LIMIT_PER_SECOND="0.5", GATEWAY_RATE_LIMIT_BURST="3")
    yield service
    assert service.stop(signal.SIGTERM) == 0


@pytest.fixture(scope="module")
def mtls_gateway(stack: Stack, pki: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    directory = tmp_path_factory.mktemp("mtls-gateway")
    service = start_gateway(stack, directory / "gateway.log", GATEWAY_TLS_CERT=str(pki["server"].cert),
                            GATEWAY_TLS_KEY=str(pki["server"].key), GATEWAY_TLS_CLIENT_CA=str(pki["ca"].issued.cert))
    yield service
    assert service.stop(signal.SIGTERM) == 0


def tls_channel(address: str, pki: dict, client: str | None = None) -> grpc.Channel:
    key, chain = pki[client].read() if client else (None, None)
    credentials = grpc.ssl_channel_credentials(root_certificates=pki["ca"].pem, private_key=key,
                                               certificate_chain=chain)
    return grpc.secure_channel(address, credentials)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def classify(channel: grpc.Channel, metadata=None) -> recognition_pb2.ClassifyResponse:
    stub = recognition_pb2_grpc.ProductRecognitionStub(channel)
    return stub.Classify(recognition_pb2.ClassifyRequest(image=photo_bytes("coffee.png"), top_k=1),
                         metadata=metadata, timeout=30)


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_tls_gateway_classifies_and_refuses_plaintext(tls_gateway: Service, pki: dict) -> None:
    with tls_channel(tls_gateway.address, pki) as channel:
        assert classify(channel, bearer(ALICE)).predictions[0].label == "espresso"
    with grpc.insecure_channel(tls_gateway.address) as plain:
        assert code_of(lambda: classify(plain, bearer(ALICE))) == grpc.StatusCode.UNAVAILABLE


def test_token_is_required_but_health_and_reflection_stay_open(tls_gateway: Service, pki: dict) -> None:
    before = scrape(tls_gateway.metrics_port)
    with tls_channel(tls_gateway.address, pki) as channel:
        for metadata in (None, bearer("not-a-token-not-a-token"), [("authorization", f"Basic {ALICE}")]):
            with pytest.raises(grpc.RpcError) as info:
                classify(channel, metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details()
        # Kubernetes probes and grpcurl need no token.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        services = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = [s.name for reply in services for s in reply.list_services_response.service]
        assert "shopvision.v1.ProductRecognition" in names
    after = scrape(tls_gateway.metrics_port)
    # Counted through the ErrorInterceptor like every other refusal.
    assert value(after, "shopvision_gateway_requests_total", method="Classify", code="UNAUTHENTICATED") - value(
        before, "shopvision_gateway_requests_total", method="Classify", code="UNAUTHENTICATED") == 3
    assert value(after, "shopvision_gateway_auth_failures_total") - value(
        before, "shopvision_gateway_auth_failures_total") == 3
    # The token never reaches the log.
    assert ALICE not in tls_gateway.log_text()


def test_rate_limit_is_per_caller(tls_gateway: Service, pki: dict) -> None:
    with tls_channel(tls_gateway.address, pki) as channel:
        stub = recognition_pb2_grpc.ProductRecognitionStub(channel)

        def list_models(token: str) -> grpc.StatusCode:
            return code_of(lambda: stub.ListModels(recognition_pb2.ListModelsRequest(), metadata=bearer(token),
                                                   timeout=10))

        # Bob's bucket (3 requests, refilled at 0.5/s) is spent within a burst; Alice's is untouched by it.
        bob = [list_models(BOB) for _ in range(6)]
        assert bob[:2] == [grpc.StatusCode.OK] * 2, bob
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in bob[3:], bob
        assert list_models(ALICE) == grpc.StatusCode.OK
        with pytest.raises(grpc.RpcError) as info:
            stub.ListModels(recognition_pb2.ListModelsRequest(), metadata=bearer(BOB), timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bob is over its rate limit" in info.value.details()
    assert value(scrape(tls_gateway.metrics_port), "shopvision_gateway_rate_limited_total") >= 2


def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(mtls_gateway: Service, pki: dict) -> None:
    with tls_channel(mtls_gateway.address, pki, client="client") as channel:
        assert classify(channel).predictions[0].label == "espresso"
    for client in (None, "rogue_client"):
        with tls_channel(mtls_gateway.address, pki, client=client) as channel:
            assert code_of(lambda: classify(channel)) == grpc.StatusCode.UNAVAILABLE, client


def test_make_run_readiness_check_understands_tls(tls_gateway: Service, pki: dict) -> None:
    port = int(tls_gateway.address.rpartition(":")[2])
    assert Stack(ports=Ports(gateway=port), extra_env={"GATEWAY_TLS_CERT": str(pki["server"].cert)}).gateway_ready()
    assert not Stack(ports=Ports(gateway=port), extra_env={"GATEWAY_TLS_CERT": ""}).gateway_ready()


def test_plaintext_is_refused_off_loopback_unless_allowed() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_ALLOW_PLAINTEXT"):
        GatewayConfig.from_env({"GATEWAY_ADDRESS": "0.0.0.0:50051"})
    assert GatewayConfig.from_env({"GATEWAY_ADDRESS": "0.0.0.0:50051", "GATEWAY_ALLOW_PLAINTEXT": "true"})
    assert GatewayConfig.from_env({"GATEWAY_ADDRESS": "[::1]:50051"})
    with pytest.raises(ConfigError, match="GATEWAY_TLS_KEY"):
        GatewayConfig.from_env({"GATEWAY_TLS_CERT": __file__})
    with pytest.raises(ConfigError, match="is not a readable file"):
        GatewayConfig.from_env({"GATEWAY_TLS_CERT": "/nonexistent.crt", "GATEWAY_TLS_KEY": "/nonexistent.key"})
    with pytest.raises(ConfigError, match="at least 16"):
        GatewayConfig.from_env({"GATEWAY_AUTH_TOKEN": "short"})
