"""Preprocess service settings, from environment variables (read once at start-up)."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.config import ConfigError, env_float, env_int, env_str

MiB = 1024 * 1024


@dataclass(frozen=True)
class PreprocessConfig:
    address: str
    metrics_port: int
    max_image_bytes: int
    max_image_pixels: int
    workers: int
    grace_s: float
    log_level: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PreprocessConfig:
        config = cls(
            address=env_str("PREPROCESS_ADDRESS", "127.0.0.1:50052", env),
            metrics_port=env_int("PREPROCESS_METRICS_PORT", 9102, env, minimum=0),
            max_image_bytes=env_int("PREPROCESS_MAX_IMAGE_BYTES", 20 * MiB, env, minimum=1024),
            max_image_pixels=env_int("PREPROCESS_MAX_IMAGE_PIXELS", 50_000_000, env, minimum=1),
            workers=env_int("PREPROCESS_WORKERS", os.cpu_count() or 2, env, minimum=1),
            grace_s=env_float("PREPROCESS_GRACE_SECONDS", 5.0, env, minimum=0.0),
            log_level=env_str("PREPROCESS_LOG_LEVEL", "INFO", env),
        )
        if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"PREPROCESS_LOG_LEVEL={config.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        return config
