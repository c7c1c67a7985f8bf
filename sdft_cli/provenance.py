"""What a run directory records about how it was made, and the check that a resumed run is the same run.

``config.yaml`` is the resolved config; ``provenance.json`` holds the package version, the git
revision, every installed package and, for every start of the run, when, where, how many processes and
the command line (credentials redacted). A run directory that holds a different config is refused.
"""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from sdft_cli import __version__, distributed
from sdft_cli.artifacts import RunLayout, atomic_write_json, read_json
from sdft_cli.config import Config
from sdft_cli.errors import RunDirError
from sdft_cli.logger import redact_argv

# Keys that do not change results: a run may be resumed with different values for them. (Batch sizes
# of generation do: they change how a step's random stream maps to samples, and bf16 padding numerics.)
VOLATILE_KEYS = ("run_dir", "runs_root", "name", "device", "threads", "logger", "dist")
PACKAGES = (
    "sdft-cli",
    "torch",
    "transformers",
    "datasets",
    "hydra-core",
    "omegaconf",
    "accelerate",
    "safetensors",
    "tokenizers",
    "wandb",
    "typer",
    "numpy",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def check_config(layout: RunLayout, cfg: Config) -> None:
    """Refuse to resume a run directory that holds a run with a different config."""
    if not layout.config.is_file():
        return
    old = _flatten(OmegaConf.to_container(OmegaConf.load(layout.config)))  # type: ignore[arg-type]
    new = _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))  # type: ignore[arg-type]
    volatile = lambda k: any(k == v or k.startswith(v + ".") for v in VOLATILE_KEYS)  # noqa: E731
    diff = sorted(k for k in set(old) | set(new) if not volatile(k) and old.get(k) != new.get(k))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
        more = f" (+{len(diff) - 4} more)" if len(diff) > 4 else ""
        raise RunDirError(
            f"{layout.root} holds a run with a different config ({shown}{more}); "
            "choose another run_dir=... or remove that directory"
        )


def git_revision() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def data_hashes(tasks: dict) -> dict[str, str]:
    """sha256 of each task's rows as the run reads them (train, validation and test examples, in order):
    two runs with the same hash trained and were scored on the same data."""
    import dataclasses
    import hashlib
    import json

    out = {}
    for name, task in tasks.items():
        rows = {s: [dataclasses.asdict(ex) for ex in getattr(task, s)] for s in ("train", "val", "test")}
        out[name] = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    return out


def write_provenance(layout: RunLayout, data: dict[str, str] | None = None) -> None:
    """``data``: ``data_hashes`` of the run's tasks and probes."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    old = read_json(layout.provenance) if layout.provenance.is_file() else {}
    starts = old.get("starts", []) + [
        {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(),
            "argv": redact_argv(sys.argv),
            "processes": distributed.current().world,
        }
    ]
    atomic_write_json(
        layout.provenance,
        {
            "sdft_cli": __version__,
            "git": git_revision(),
            "python": platform.python_version(),
            "packages": versions,
            "data": data or {},
            "all_packages": sorted(
                f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
            ),
            "starts": starts,
        },
    )
