"""Settings of the local Triton launcher, from environment variables."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from services.common.config import env_bool, env_int, env_str
from services.common.tracing import otlp_http_traces_url

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class TritonConfig:
    model_repository: Path
    backend_directory: Path
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log_verbose: int
    exit_timeout_s: int
    load_models: tuple[str, ...]
    reuse_ports: bool = False
    trace_url: str = ""  # OTLP/HTTP URL for Triton's OpenTelemetry spans; empty = tracing off

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TritonConfig:
        load = env_str("TRITON_LOAD_MODELS", "*", env)
        return cls(
            model_repository=Path(env_str("TRITON_MODEL_REPOSITORY", str(REPO_ROOT / "model_repository"), env)),
            backend_directory=Path(
                env_str("TRITON_BACKEND_DIRECTORY", str(REPO_ROOT / ".cache" / "triton-backends"), env)),
            host=env_str("TRITON_HOST", "127.0.0.1", env),
            http_port=env_int("TRITON_HTTP_PORT", 8000, env, minimum=1),
            grpc_port=env_int("TRITON_GRPC_PORT", 8001, env, minimum=1),
            metrics_port=env_int("TRITON_METRICS_PORT", 8002, env, minimum=1),
            log_verbose=env_int("TRITON_LOG_VERBOSE", 0, env, minimum=0),
            exit_timeout_s=env_int("TRITON_EXIT_TIMEOUT_SECONDS", 10, env, minimum=0),
            load_models=tuple(m.strip() for m in load.split(",") if m.strip()),
            reuse_ports=env_bool("TRITON_REUSE_PORTS", False, env),
            trace_url=otlp_http_traces_url(env),
        )
