"""Configuration is read once, from the environment, and bad values fail fast with the variable's name."""
from __future__ import annotations

import subprocess
import sys

import pytest

from devstack.stack import REPO_ROOT
from services.common.config import ConfigError, split_address
from services.gateway.config import GatewayConfig
from services.preprocess.config import PreprocessConfig
from services.triton.config import TritonConfig
from services.triton.launcher import command


def test_defaults() -> None:
    gateway = GatewayConfig.from_env({})
    assert gateway.address == "127.0.0.1:50051"
    assert gateway.preprocess_address == "127.0.0.1:50052"
    assert gateway.triton_address == "127.0.0.1:8001"
    assert gateway.metrics_port == 9101
    assert gateway.max_image_bytes == 20 * 1024 * 1024
    assert PreprocessConfig.from_env({}).metrics_port == 9102
    triton = TritonConfig.from_env({})
    assert (triton.http_port, triton.grpc_port, triton.metrics_port, triton.host) == (8000, 8001, 8002, "127.0.0.1")


def test_bad_values_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_MAX_IN_FLIGHT"):
        GatewayConfig.from_env({"GATEWAY_MAX_IN_FLIGHT": "lots"})
    with pytest.raises(ConfigError, match="PREPROCESS_WORKERS=0"):
        PreprocessConfig.from_env({"PREPROCESS_WORKERS": "0"})
    with pytest.raises(ConfigError, match="not host:port"):
        split_address("X", "localhost")


def test_triton_command_uses_explicit_model_control_on_loopback() -> None:
    args = command(TritonConfig.from_env({"TRITON_GRPC_PORT": "9001"}))
    assert "--model-control-mode=explicit" in args
    assert "--grpc-port=9001" in args and "--grpc-address=127.0.0.1" in args
    assert "--load-model=*" in args


def test_service_exits_with_clear_message_on_bad_config() -> None:
    proc = subprocess.run([sys.executable, "-m", "services.gateway"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "GATEWAY_DEFAULT_TOP_K": "-3",
                               "PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'gen'}"}, timeout=60)
    assert proc.returncode != 0
    assert "GATEWAY_DEFAULT_TOP_K=-3 must be >= 1" in proc.stderr


def test_catalog_defaults_to_the_database_make_run_starts() -> None:
    search = GatewayConfig.from_env({}).search
    assert search.enabled and search.database_url == "postgresql://shopvision@127.0.0.1:55432/shopvision"
    assert not GatewayConfig.from_env({"GATEWAY_CATALOG_DATABASE_URL": ""}).search.enabled


@pytest.mark.parametrize("name", ["GATEWAY_SEARCH_DIR", "GATEWAY_SEARCH_PRECISION", "GATEWAY_SEARCH_MODEL_VERSION"])
def test_settings_of_the_removed_per_pod_index_are_refused_with_the_way_forward(name: str) -> None:
    with pytest.raises(ConfigError) as error:
        GatewayConfig.from_env({name: "x"})
    assert name in str(error.value) and "GATEWAY_CATALOG_DATABASE_URL" in str(error.value)


def test_duplicate_threshold_is_a_cosine_similarity() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_CATALOG_DUPLICATE_THRESHOLD"):
        GatewayConfig.from_env({"GATEWAY_CATALOG_DUPLICATE_THRESHOLD": "1.5"})
