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
