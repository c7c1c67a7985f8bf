"""Hydra glue: schema registration, the run-directory resolver, composition and one-line errors.

`sdft run` composes through ``@hydra.main`` (main.py); the inspection commands and the pre-flight
check use the compose API here. Only this module, main.py and cli.py import Hydra.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from sdft_cli.config import Config, EvalConfig, LoggerConfig, ModelConfig, RolloutConfig
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
# Groups that take a list of options (the curriculum); every other group takes one.
MULTI_GROUPS = ("task",)
REQUIRED_GROUPS = ("model", "method", "rollout", "task", "eval", "logger")


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    from sdft_cli.methods import METHODS  # here, not at the top: `sdft ls` should not import torch

    cs = ConfigStore.instance()
    cs.store(name="schema_config", node=Config)
    cs.store(group="schema/model", name="model", node=ModelConfig)
    for name, method in METHODS.items():
        cs.store(group="schema/method", name=name, node=method.schema)
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
    unknown = _unknown_keys(OmegaConf.to_container(cfg), OmegaConf.to_container(OmegaConf.structured(obj)))
    if unknown:
        key, siblings = unknown
        import difflib

        close = difflib.get_close_matches(key.rpartition(".")[2], siblings, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: unknown key; it is not part of the config and would be ignored{hint}")
    return obj


def _unknown_keys(given: object, typed: object, prefix: str = "") -> tuple[str, list[str]] | None:
    """The first key of the composed config that the typed config does not have (one added with
    ``+key=value``), with the keys that exist next to it; None when there is none."""
    if not isinstance(given, dict) or not isinstance(typed, dict):
        return None
    for key, value in given.items():
        full = f"{prefix}{key}"
        if key not in typed:
            return full, [str(k) for k in typed]
        found = _unknown_keys(value, typed[key], full + ".")
        if found:
            return found
    return None


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
    check_overrides(list(overrides))
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


def check_overrides(overrides: list[str]) -> None:
    """What Hydra accepts but reports badly, or not at all, named by the override: a malformed override,
    a list for a group that takes one option, a task twice in the curriculum (it would train once)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in expand_aliases(overrides):
        try:
            (o,) = parser.parse_overrides([text])
        except Exception as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            detail = "; ".join(ln for ln in lines if not ln.startswith("See ") and set(ln) != {"^"})
            raise ConfigError(f"malformed override {text!r}: {detail or type(e).__name__}") from None
        if not o.key_or_group:
            raise ConfigError(f"malformed override {text!r}: no key before '='")
        group = o.key_or_group
        if group in REQUIRED_GROUPS and (o.is_delete() or (not o.is_sweep_override() and o.value() is None)):
            raise ConfigError(f"{text}: every run needs a {group}; choose one with {group}=<option>")
        if group in GROUPS and not o.is_sweep_override() and not o.is_delete() and o.value() is None:
            none = (conf_dir() / group / "none.yaml").is_file()
            instead = f"{group}=none" if none else f"~{group}"
            raise ConfigError(f"{text}: a config group takes an option name; for no {group}, use {instead}")
        if o.is_sweep_override() or o.is_delete():
            continue
        value = o.value()
        if group in GROUPS and group not in MULTI_GROUPS and isinstance(value, list):
            raise ConfigError(
                f"{group} takes one option, got a list {text.partition('=')[2]}; sweep over options with "
                f"-m {group}={','.join(str(v) for v in value)}"
            )
        if group in MULTI_GROUPS and isinstance(value, list):
            twice = sorted({str(v) for v in value if value.count(v) > 1})
            if twice:
                raise ConfigError(
                    f"{group}: {', '.join(twice)} appear(s) more than once in {text.partition('=')[2]}; "
                    "a task trains once per run (to train it again, copy its config under another name)"
                )


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
    msg = lines[0] if lines else type(e).__name__
    if e.__cause__ is not None:  # "Error merging override k=v" says where; its cause says what is wrong
        cause = str(e.__cause__).splitlines()
        if cause and cause[0].strip():
            msg = f"{msg.rstrip('.')}: {cause[0].strip()}"
    return msg
