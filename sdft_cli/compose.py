"""Hydra glue: schema registration, the run-directory resolver, composition and one-line errors.

`sdft run` composes through ``@hydra.main`` (main.py); the inspection commands and the pre-flight
check use the compose API here. Only this module, main.py and cli.py import Hydra.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from sdft_cli.config import METHOD_SCHEMAS, Config, EvalConfig, LoggerConfig, ModelConfig, RolloutConfig
from sdft_cli.errors import ConfigError

CONF_PACKAGE = "sdft_cli.conf"
GROUPS = (
    "model",
    "method",
    "rollout",
    "task",
    "eval",
    "eval/prior",
    "logger",
    "experiment",
    "hydra/launcher",
)
# Nested groups also accepted in dotted form, as their config key reads: eval.prior=paper -> eval/prior=paper.
NESTED_GROUPS = ("eval/prior",)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="schema_config", node=Config)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    for name, schema in METHOD_SCHEMAS.items():
        cs.store(group="schema/method", name=name, node=schema)
    cs.store(group="schema/rollout", name="rollout", node=RolloutConfig)
    cs.store(group="schema/eval", name="eval", node=EvalConfig)
    cs.store(group="schema/logger", name="logger", node=LoggerConfig)


def run_subdir(override_dirname: str) -> str:
    """Directory name of a run from its overrides: stable, so re-running a command resumes it."""
    if not override_dirname:
        return "default"
    name = override_dirname.replace("/", "_").replace("\\", "_")
    if len(name) > 120:
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:10]
    return name


def expand_aliases(args: list[str]) -> list[str]:
    """``eval.prior=paper`` -> ``eval/prior=paper``: choosing an option of a nested group by its key.

    Only a bare option name is rewritten; ``eval.prior.limit=100`` and ``eval.prior={...}`` stay as they are.
    """
    out = []
    for a in args:
        key, eq, value = a.partition("=")
        group = key.replace(".", "/")
        if eq and group in NESTED_GROUPS and value.replace("_", "").isalnum():
            a = f"{group}={value}"
        out.append(a)
    return out


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("sdft.subdir", run_subdir, replace=True)


def to_config(cfg: DictConfig) -> Config:
    """Convert the composed DictConfig into dataclasses, turning every failure into a one-line ConfigError."""
    cfg = cfg.copy()
    if "hydra" in cfg:
        with open_dict(cfg):
            del cfg["hydra"]
    try:
        obj = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(format_omegaconf_error(e)) from None
    if not isinstance(obj, Config):  # pragma: no cover - the defaults list always starts with the schema
        raise ConfigError("the config does not extend schema_config")
    return obj


def format_omegaconf_error(e: Exception) -> str:
    """OmegaConf errors span several lines (full_key, object_type); keep the message and the key."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    key = getattr(e, "full_key", None)
    if key and key not in msg:
        msg = f"{key}: {msg}"
    return msg


def conf_dir() -> Path:
    """The config tree: shipped in the package (`sdft_cli/conf`) or, in a source checkout, `conf/`."""
    import importlib.resources

    return Path(str(importlib.resources.files(CONF_PACKAGE)))


def compose_raw(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose the config tree with Hydra's compose API (inspection commands; `sdft run` uses @hydra.main).

    The Hydra node is kept and registered, so `${hydra:...}` interpolations resolve as in a real run.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    register_configs()
    register_resolvers()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONF_PACKAGE, version_base="1.3"):
            cfg = hydra_compose("config", overrides=expand_aliases(list(overrides)), return_hydra_config=True)
    except Exception as e:
        raise ConfigError(format_hydra_error(e)) from None
    HydraConfig.instance().set_config(cfg)
    return cfg


def compose(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    return to_config(compose_raw(overrides))


def format_hydra_error(e: Exception) -> str:
    """One line for Hydra's composition errors: name the group and option, list what exists."""
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, option = e.missing_cfg_file.rpartition("/")
        available = ", ".join(o for o in (e.options or []) if not o.startswith("base")) or "none"
        if group:
            return f"unknown {group} {option!r} (available: {available})"
        return f"config {option!r} not found"
    if isinstance(e, OmegaConfBaseException):
        return format_omegaconf_error(e)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
