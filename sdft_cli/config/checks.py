"""Value checks shared by the schemas: each names the full config key it checks.

Comparisons are written so that NaN fails them (``not value > 0``), and infinities are refused: no size,
rate or limit of this package means anything at infinity.
"""

from __future__ import annotations

import math
from typing import Any

from sdft_cli.errors import ConfigError


def _choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(options)}")


def _finite(key: str, value: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")


def _positive(key: str, value: float) -> None:
    _finite(key, value)
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _nonneg(key: str, value: float) -> None:
    _finite(key, value)
    if not value >= 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")


def _nonempty(key: str, value: str | None) -> None:
    if value is not None and not str(value).strip():
        raise ConfigError(f"{key} must not be empty")
