"""Run logging: ``metrics.jsonl`` always, Weights & Biases when ``logger=wandb``, timers for named phases.

Records are flat dicts with ``/``-namespaced keys (``train/loss``, ``time/rollout``, ``eval/facts/acc``).
On resume the log is rewound to the checkpoint's step, so it never holds a step twice. The command line
recorded with a run (provenance.json, W&B's metadata) has credentials redacted: no environment variable
is recorded, and the config holds only the names of the variables that hold keys.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from sdft_cli.artifacts import DiskWriteError, RunLayout, atomic_write_text
from sdft_cli.config import LoggerConfig
from sdft_cli.config.credentials import looks_secret
from sdft_cli.distributed import sum_floats

REDACTED = "<redacted>"


def redact_argv(argv: list[str], env: Mapping[str, str] | None = None) -> list[str]:
    """``argv`` safe to record: the value of a credential-named override (``hydra.job.env_set.HF_TOKEN=...``)
    and any occurrence of a credential-named environment variable's value are replaced."""
    env = os.environ if env is None else env
    secrets = sorted((v for k, v in env.items() if looks_secret(k) and len(v) >= 6), key=len, reverse=True)
    out = []
    for arg in argv:
        key, eq, _ = arg.partition("=")
        if eq and looks_secret(key.lstrip("+~").rsplit(".", 1)[-1]):
            arg = f"{key}={REDACTED}"
        for value in secrets:
            arg = arg.replace(value, REDACTED)
        out.append(arg)
    return out


@contextmanager
def _redacted_argv() -> Iterator[None]:
    """W&B records ``sys.argv`` when a run starts: show it the redacted command line."""
    saved = sys.argv
    sys.argv = redact_argv(saved)
    try:
        yield
    finally:
        sys.argv = saved


class Timer:
    """Accumulates wall time per named phase (verl-style ``with timer("rollout"):``)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - start

    def move(self, seconds: float, source: str, target: str) -> None:
        """Count ``seconds`` measured inside ``source`` as ``target``'s (work nested in another phase)."""
        self.totals[source] -= seconds
        self.totals[target] += seconds

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": round(v, 4) for k, v in self.totals.items()}
        self.totals.clear()
        return out


class TokenMeans:
    """Token means of per-token statistics over a whole optimizer step (all its micro-batches)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    def add(self, name: str, values, mask) -> None:
        self.sums[name] += float((values * mask).sum())
        self.counts[name] += float(mask.sum())

    def means(self) -> dict[str, float]:
        """Means over every rank's tokens (in a distributed run every rank must call this)."""
        names = sorted(self.sums)
        totals = sum_floats([self.sums[k] for k in names] + [self.counts[k] for k in names])
        sums, counts = totals[: len(names)], totals[len(names) :]
        return {k: s / c if c else 0.0 for k, s, c in zip(names, sums, counts, strict=True)}


def append_jsonl(path: Path, record: dict) -> None:
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False, default=float) + "\n")
            f.flush()
    except OSError as e:  # a full disk or quota: one error naming the file, as atomic writes give
        reason = e.strerror or str(e)
        raise DiskWriteError(
            f"cannot append to {path}: {reason} (a torn last line is dropped when the run resumes)"
        ) from e


def rewind_jsonl(path: Path, keep) -> None:
    """Atomically drop the records for which ``keep(record)`` is false (torn last lines are dropped too)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if keep(record):
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


class RunLogger:
    def __init__(self, cfg: LoggerConfig, layout: RunLayout, config: dict, name: str):
        self.cfg, self.layout = cfg, layout
        self.path = layout.metrics_log
        self.global_step = self._count_steps()
        self.wandb = None
        if cfg.name == "wandb":
            import wandb

            run_id = hashlib.sha1(str(layout.root.resolve()).encode()).hexdigest()[:16]
            with _redacted_argv():
                self.wandb = wandb.init(
                    project=cfg.project,
                    entity=cfg.entity,
                    name=name,
                    id=run_id,
                    resume="allow",
                    dir=str(layout.root),
                    config=config,
                    tags=list(cfg.tags),
                    mode=cfg.mode or os.environ.get("WANDB_MODE") or "online",
                )
            self.wandb.define_metric("global_step")
            self.wandb.define_metric("*", step_metric="global_step")

    def rewind(self, stage: int, step: int) -> None:
        """Forget records of ``stage`` after ``step`` (they are about to be recomputed)."""
        rewind_jsonl(self.path, lambda r: not (r.get("stage") == stage and r.get("step", 0) > step))
        self.global_step = self._count_steps()

    def _count_steps(self) -> int:
        if not self.path.is_file():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return sum('"step":' in line and '"event":' not in line for line in lines)

    def rewind_eval(self, stage: int) -> None:
        """Forget evaluation records of ``stage`` (an evaluation cut short is about to run again)."""
        rewind_jsonl(self.path, lambda r: not (r.get("stage") == stage and r.get("event") == "eval"))

    def log(self, record: dict) -> None:
        if "step" in record and "event" not in record:  # an optimizer step (not an evaluation at one)
            self.global_step += 1
        record = {"global_step": self.global_step, **record}
        append_jsonl(self.path, record)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def log_matrix(self, data: dict, png: Path) -> None:
        """Mirror the forgetting matrix to W&B: a long-format table, the heatmap image and summary metrics."""
        if self.wandb is None:
            return
        import wandb

        rows = []
        for label, values in zip(data["rows"], data["values"], strict=True):
            for col, value in zip(data["columns"], values, strict=True):
                rows.append([label, col, value])
        self.wandb.log(
            {
                "global_step": self.global_step,
                "cl/matrix": wandb.Table(columns=["stage", "eval_task", "value"], data=rows),
                "cl/heatmap": wandb.Image(str(png)),
            }
        )
        self.wandb.summary.update({f"cl/{k}": v for k, v in data["metrics"].items() if v is not None})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class NullLogger:
    """The logger of ranks > 0 in a distributed run: rank 0 logs each step's totals over all ranks."""

    def log(self, record: dict) -> None:
        pass

    def rewind(self, stage: int, step: int) -> None:
        pass

    def rewind_eval(self, stage: int) -> None:
        pass

    def log_matrix(self, data: dict, png: Path) -> None:
        pass

    def close(self) -> None:
        pass
