"""Gateway settings, from environment variables (read once at start-up)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from services.common.config import ConfigError, env_float, env_int, env_str

MiB = 1024 * 1024


@dataclass(frozen=True)
class GatewayConfig:
    address: str
    metrics_port: int
    preprocess_address: str
    triton_address: str
    default_model: str
    default_top_k: int
    max_image_bytes: int
    max_in_flight: int
    max_batch_items: int
    default_timeout_s: float
    health_interval_s: float
    model_refresh_s: float
    grace_s: float
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "GatewayConfig":
        config = cls(
            address=env_str("GATEWAY_ADDRESS", "127.0.0.1:50051", env),
            metrics_port=env_int("GATEWAY_METRICS_PORT", 9101, env, minimum=0),
            preprocess_address=env_str("GATEWAY_PREPROCESS_ADDRESS", "127.0.0.1:50052", env),
            triton_address=env_str("GATEWAY_TRITON_ADDRESS", "127.0.0.1:8001", env),
            default_model=env_str("GATEWAY_DEFAULT_MODEL", "efficientnet_lite0_imagenet", env),
            default_top_k=env_int("GATEWAY_DEFAULT_TOP_K", 5, env, minimum=1),
            max_image_bytes=env_int("GATEWAY_MAX_IMAGE_BYTES", 20 * MiB, env, minimum=1024),
            max_in_flight=env_int("GATEWAY_MAX_IN_FLIGHT", 64, env, minimum=1),
            max_batch_items=env_int("GATEWAY_MAX_BATCH_ITEMS", 32, env, minimum=1),
            default_timeout_s=env_float("GATEWAY_DEFAULT_TIMEOUT_SECONDS", 10.0, env, minimum=0.01),
            health_interval_s=env_float("GATEWAY_HEALTH_INTERVAL_SECONDS", 1.0, env, minimum=0.05),
            model_refresh_s=env_float("GATEWAY_MODEL_REFRESH_SECONDS", 10.0, env, minimum=0.1),
            grace_s=env_float("GATEWAY_GRACE_SECONDS", 5.0, env, minimum=0.0),
            log_level=env_str("GATEWAY_LOG_LEVEL", "INFO", env),
        )
        if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"GATEWAY_LOG_LEVEL={config.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        return config
