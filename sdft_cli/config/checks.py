"""Value checks shared by the schemas: each names the full config key it checks."""

from __future__ import annotations

from typing import Any

from sdft_cli.errors import ConfigError


def _choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(options)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _nonneg(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")
