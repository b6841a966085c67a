"""Gateway settings, from environment variables (read once at start-up)."""
from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.common.config import ConfigError, env_bool, env_float, env_int, env_str

MiB = 1024 * 1024
DEFAULT_DATABASE_URL = "postgresql://shopvision@127.0.0.1:55432/shopvision"


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
    batch_chunk_images: int
    default_timeout_s: float
    health_interval_s: float
    model_refresh_s: float
    grace_s: float
    log_level: str
    security: SecurityConfig
    retry: RetryConfig
    search: SearchConfig
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig.from_env({}))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> GatewayConfig:
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
            batch_chunk_images=env_int("GATEWAY_BATCH_CHUNK_IMAGES", 8, env, minimum=1),
            default_timeout_s=env_float("GATEWAY_DEFAULT_TIMEOUT_SECONDS", 10.0, env, minimum=0.01),
            health_interval_s=env_float("GATEWAY_HEALTH_INTERVAL_SECONDS", 1.0, env, minimum=0.05),
            # How often the models, their calibration and a rollout's split are re-read from Triton (on the
            # health loop, every GATEWAY_HEALTH_INTERVAL_SECONDS): a split change reaches every replica within
            # about the sum of the two.
            model_refresh_s=env_float("GATEWAY_MODEL_REFRESH_SECONDS", 1.0, env, minimum=0.1),
            grace_s=env_float("GATEWAY_GRACE_SECONDS", 5.0, env, minimum=0.0),
            log_level=env_str("GATEWAY_LOG_LEVEL", "INFO", env),
            security=SecurityConfig.from_env(env),
            retry=RetryConfig.from_env(env),
            search=SearchConfig.from_env(env),
            rollout=RolloutConfig.from_env(env),
        )
        if not config.security.tls_cert and not config.security.allow_plaintext and not is_loopback(config.address):
            raise ConfigError(f"GATEWAY_ADDRESS={config.address} is not a loopback address: serve TLS "
                              "(GATEWAY_TLS_CERT, GATEWAY_TLS_KEY) or set GATEWAY_ALLOW_PLAINTEXT=true")
        if config.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"GATEWAY_LOG_LEVEL={config.log_level!r} is not DEBUG, INFO, WARNING or ERROR")
        return config


def is_loopback(address: str) -> bool:
    """True when ``host:port`` binds only the loopback interface."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _existing_file(name: str, env: Mapping[str, str] | None) -> str:
    path = env_str(name, "", env)
    if path and not Path(path).is_file():
        raise ConfigError(f"{name}={path} is not a readable file")
    return path


@dataclass(frozen=True)
class RolloutConfig:
    """Canary and shadow rollouts (services/gateway/routing.py) and the ``confident`` flag of answers."""

    # Score at or above which a Prediction is ``confident`` when the answering version has no per-class
    # thresholds (parameter shopvision.thresholds, written by training.calibrate).
    confidence_threshold: float
    # Comparison calls (shadow copies, and the serving copies of canary answers) in flight at once; more are
    # dropped and counted in shopvision_gateway_shadow_dropped_total, never queued.
    shadow_max_in_flight: int
    shadow_timeout_s: float  # deadline of one comparison call

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RolloutConfig:
        config = cls(
            confidence_threshold=env_float("GATEWAY_CONFIDENCE_THRESHOLD", 0.5, env, minimum=0.0),
            shadow_max_in_flight=env_int("GATEWAY_SHADOW_MAX_IN_FLIGHT", 4, env, minimum=0),
            shadow_timeout_s=env_float("GATEWAY_SHADOW_TIMEOUT_SECONDS", 5.0, env, minimum=0.01),
        )
        if config.confidence_threshold > 1.0:
            raise ConfigError(f"GATEWAY_CONFIDENCE_THRESHOLD={config.confidence_threshold} is above 1 "
                              "(a probability)")
        return config


@dataclass(frozen=True)
class SecurityConfig:
    """TLS / mutual TLS, bearer tokens and per-caller rate limits of the public endpoint (all off by default)."""

    tls_cert: str
    tls_key: str
    tls_client_ca: str
    allow_plaintext: bool
    auth_token: str = field(repr=False)
    auth_tokens_file: str
    rate_limit_per_s: float
    rate_limit_burst: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SecurityConfig:
        config = cls(
            tls_cert=_existing_file("GATEWAY_TLS_CERT", env),
            tls_key=_existing_file("GATEWAY_TLS_KEY", env),
            tls_client_ca=_existing_file("GATEWAY_TLS_CLIENT_CA", env),
            allow_plaintext=env_bool("GATEWAY_ALLOW_PLAINTEXT", False, env),
            auth_token=env_str("GATEWAY_AUTH_TOKEN", "", env),
            auth_tokens_file=_existing_file("GATEWAY_AUTH_TOKENS_FILE", env),
            rate_limit_per_s=env_float("GATEWAY_RATE_LIMIT_PER_SECOND", 0.0, env, minimum=0.0),
            rate_limit_burst=env_int("GATEWAY_RATE_LIMIT_BURST", 0, env, minimum=0),
        )
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ConfigError("GATEWAY_TLS_CERT and GATEWAY_TLS_KEY must be set together")
        if config.tls_client_ca and not config.tls_cert:
            raise ConfigError("GATEWAY_TLS_CLIENT_CA (mutual TLS) needs GATEWAY_TLS_CERT and GATEWAY_TLS_KEY")
        if config.auth_token and len(config.auth_token) < 16:
            raise ConfigError("GATEWAY_AUTH_TOKEN must be at least 16 characters")
        return config

    @property
    def burst(self) -> int:
        """Bucket size of the rate limiter: GATEWAY_RATE_LIMIT_BURST, or one second's worth (at least 1)."""
        return self.rate_limit_burst or max(1, round(self.rate_limit_per_s))


@dataclass(frozen=True)
class RetryConfig:
    """Retries of the idempotent downstream calls, both run by the one engine of services/gateway/retry.py:
    preprocess, and Triton inference while Triton swaps, drains or cannot be reached (services/gateway/triton.py)."""

    max_attempts: int
    initial_backoff_s: float
    window_s: float
    budget_ratio: float
    budget_min_per_s: float
    triton_drain_window_s: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RetryConfig:
        return cls(
            max_attempts=env_int("GATEWAY_PREPROCESS_MAX_ATTEMPTS", 3, env, minimum=1),
            initial_backoff_s=env_float("GATEWAY_RETRY_BACKOFF_SECONDS", 0.05, env, minimum=0.0),
            window_s=env_float("GATEWAY_RETRY_WINDOW_SECONDS", 3.0, env, minimum=0.0),
            budget_ratio=env_float("GATEWAY_RETRY_BUDGET_RATIO", 0.2, env, minimum=0.0),
            budget_min_per_s=env_float("GATEWAY_RETRY_BUDGET_MIN_PER_SECOND", 5.0, env, minimum=0.0),
            triton_drain_window_s=env_float("GATEWAY_TRITON_DRAIN_WINDOW_SECONDS", 8.0, env, minimum=0.0),
        )


@dataclass(frozen=True)
class SearchConfig:
    """The shared product catalog in PostgreSQL + pgvector (services/gateway/catalog). Every replica and every
    catalog tool reads the same database; nothing about the catalog lives only in a gateway's memory."""

    # libpq URL; empty disables the catalog RPCs (they answer UNAVAILABLE). The default is the server that
    # `make run` starts (devstack/postgres.py), so a second gateway started by hand finds the same catalog.
    database_url: str = field(repr=False)
    model: str
    max_k: int
    ef_search: int
    hnsw_m: int
    hnsw_ef_construction: int
    max_scan_tuples: int
    pool_size: int
    statement_timeout_ms: int
    duplicate_threshold: float
    max_attribute_keys: int
    max_attribute_values: int
    max_attribute_chars: int

    @property
    def enabled(self) -> bool:
        return bool(self.database_url)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SearchConfig:
        removed = [name for name in ("GATEWAY_SEARCH_DIR", "GATEWAY_SEARCH_PRECISION", "GATEWAY_SEARCH_EXACT_BELOW",
                                     "GATEWAY_SEARCH_SNAPSHOT_WRITES", "GATEWAY_SEARCH_MODEL_VERSION")
                   if env_str(name, "", env)]
        if removed:
            raise ConfigError(f"{', '.join(removed)}: no longer used. The catalog lives in PostgreSQL "
                              "(GATEWAY_CATALOG_DATABASE_URL); a catalog serves the version it was embedded with, "
                              "and python -m tools.reembed moves it to another")
        config = cls(
            database_url=env_str("GATEWAY_CATALOG_DATABASE_URL", DEFAULT_DATABASE_URL, env),
            # Embedding model of a catalog created without one. Empty: GATEWAY_DEFAULT_MODEL.
            model=env_str("GATEWAY_SEARCH_MODEL", "", env),
            max_k=env_int("GATEWAY_SEARCH_MAX_K", 100, env, minimum=1),
            ef_search=env_int("GATEWAY_SEARCH_EF", 200, env, minimum=1),
            hnsw_m=env_int("GATEWAY_CATALOG_HNSW_M", 16, env, minimum=2),
            hnsw_ef_construction=env_int("GATEWAY_CATALOG_HNSW_EF_CONSTRUCTION", 128, env, minimum=4),
            max_scan_tuples=env_int("GATEWAY_CATALOG_MAX_SCAN_TUPLES", 20_000, env, minimum=1),
            pool_size=env_int("GATEWAY_CATALOG_POOL_SIZE", 8, env, minimum=1),
            statement_timeout_ms=env_int("GATEWAY_CATALOG_STATEMENT_TIMEOUT_MS", 5_000, env, minimum=1),
            duplicate_threshold=env_float("GATEWAY_CATALOG_DUPLICATE_THRESHOLD", 0.97, env, minimum=-1.0),
            max_attribute_keys=env_int("GATEWAY_CATALOG_MAX_ATTRIBUTE_KEYS", 64, env, minimum=1),
            max_attribute_values=env_int("GATEWAY_CATALOG_MAX_ATTRIBUTE_VALUES", 500, env, minimum=1),
            max_attribute_chars=env_int("GATEWAY_CATALOG_MAX_ATTRIBUTE_CHARS", 128, env, minimum=1),
        )
        if config.duplicate_threshold > 1.0:
            raise ConfigError(f"GATEWAY_CATALOG_DUPLICATE_THRESHOLD={config.duplicate_threshold} is above 1 "
                              "(a cosine similarity)")
        return config
