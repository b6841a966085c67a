"""Read environment variables once at start-up; fail fast with a message that names the variable."""
from __future__ import annotations

import os
from collections.abc import Mapping


class ConfigError(ValueError):
    """A setting is missing or malformed."""


def env_str(name: str, default: str, env: Mapping[str, str] | None = None) -> str:
    return (env if env is not None else os.environ).get(name, default)


def env_int(name: str, default: int, env: Mapping[str, str] | None = None, minimum: int | None = None) -> int:
    raw = env_str(name, str(default), env)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def env_float(name: str, default: float, env: Mapping[str, str] | None = None, minimum: float | None = None) -> float:
    raw = env_str(name, str(default), env)
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def env_bool(name: str, default: bool, env: Mapping[str, str] | None = None) -> bool:
    raw = env_str(name, "true" if default else "false", env).strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true or false)")


def split_address(name: str, address: str) -> tuple[str, int]:
    """``host:port`` → (host, port); ``[::1]:50051`` works too."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"{name}={address!r} is not host:port")
    return host.strip("[]"), int(port)
