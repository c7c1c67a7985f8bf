"""Credentials stay in the environment: a config names the variable that holds a key, never the key,
because the resolved config is stored in the run directory, Hydra's record and W&B."""

from __future__ import annotations

import re
from typing import Any

from sdft_cli.errors import ConfigError

# A name that holds a secret (OPENAI_API_KEY, HF_TOKEN, api_key, db_password); `*_env` keys hold a
# variable's name, not its value.
_SECRET_PART = re.compile(r"(^|[_.\-])(api_?key|key|token|secret|password|passwd|credentials?)$", re.I)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Prefixes of common API keys and tokens (OpenAI, Hugging Face, GitHub, Slack).
_KEY_PREFIXES = ("sk-", "hf_", "ghp_", "github_pat_", "xox")


def looks_secret(name: str) -> bool:
    """Whether a variable or config key named ``name`` holds a credential."""
    return not name.lower().endswith("_env") and bool(_SECRET_PART.search(name))


def check_env_name(key: str, value: str | None) -> None:
    """``value`` must name an environment variable, not be a key pasted in its place."""
    if value is None:
        return
    literal = value.startswith(_KEY_PREFIXES) or (
        len(value) >= 24 and not value.isupper() and not value.islower() and any(c.isdigit() for c in value)
    )
    if not _ENV_NAME.match(value) or literal:
        raise ConfigError(
            f"{key} must name an environment variable (e.g. OPENAI_API_KEY), not hold a key; export the "
            "key in that variable"
        )


def check_no_literal_secrets(key: str, node: Any) -> None:
    """Refuse a credential-named config entry (``api_key``, ``token``, ...) that holds a value."""
    if isinstance(node, dict):
        items = node.items()
    elif hasattr(node, "__dataclass_fields__"):
        items = ((f, getattr(node, f)) for f in node.__dataclass_fields__)
    else:
        return
    for name, value in items:
        full = f"{key}.{name}" if key else str(name)
        if looks_secret(str(name)) and isinstance(value, str) and value:
            raise ConfigError(
                f"{full}: a credential in the config would be stored in the run directory and W&B; "
                "export it in an environment variable and name that variable in the endpoint's api_key_env"
            )
        check_no_literal_secrets(full, value)
