"""A sweep directory read into runs and groups: what the report computes from.

A run is a directory with a ``matrix.json`` (``sdft run`` writes one after every evaluation stage). Its
Hydra overrides decide its group: runs whose overrides agree apart from the seed and the task order
pool into one group (one method at one learning rate, say), so a group's figures average over seeds
and task orders. Runs of ``curriculum=single`` and ``curriculum=joint`` are references, kept apart.

Per run the report reads the matrix (values, columns in training order, metrics), each stage's
per-item scores (``predictions/<column>.jsonl``), periodic records (``train/validation.jsonl``), pass@k,
drift and KL to the base, and the optimizer steps of every stage (its training manifest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from sdft_cli import metrics as M
from sdft_cli.artifacts import read_json, read_jsonl
from sdft_cli.errors import RunDirError

# Overrides that never split groups: the seed, and where and how a run was logged.
POOLED_KEYS = ("seed",)
ORDER_KEY = "task"
# a run's headline numbers (run_metrics)
METRICS = ("new_task", "acc", "bwt", "fwt", "forgetting_max", "prior_avg", "prior_delta")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else []


def _f(v) -> float:
    return float("nan") if v is None else float(v)


@dataclass
class Run:
    path: Path
    overrides: list[str]
    matrix: dict
    label: str = ""
    # per stage k (1-based): the optimizer steps it ran
    steps: dict[int, int] = field(default_factory=dict)
    # (stage, column) -> per-item scores, in the test split's order (1.0 = correct)
    items: dict[tuple[int, str], list[float]] = field(default_factory=dict)
    # stage -> periodic records (validation.jsonl) of that stage's training
    periodic: dict[int, list[dict]] = field(default_factory=dict)
    # stage -> {task: {k: pass@k}}
    pass_at_k: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    # stage -> drift.json
    drift: dict[int, dict] = field(default_factory=dict)
    # task -> validation score of the checkpoint that ended it (selection.json)
    val: dict[str, float] = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)

    @property
    def meta(self) -> dict:
        return self.matrix.get("meta", {})

    @property
    def method(self) -> str:
        return str(self.meta.get("method", "?"))

    @property
    def seed(self) -> int:
        return int(self.meta.get("seed", 0))

    @property
    def curriculum(self) -> str:
        return str(self.meta.get("curriculum", "sequential"))

    @property
    def columns(self) -> list[str]:
        return list(self.matrix["columns"])

    @property
    def tasks(self) -> list[str]:
        """The trained columns, in training order."""
        return [c for c, k in zip(self.columns, self.matrix["column_kinds"], strict=True) if k == "trained"]

    @property
    def priors(self) -> list[str]:
        return [c for c, k in zip(self.columns, self.matrix["column_kinds"], strict=True) if k == "prior"]

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.tasks)

    @property
    def R(self) -> np.ndarray:
        """Rows 0..T (NaN rows for stages not evaluated yet) by columns; NaN where a cell is missing."""
        return M.full_rows(self.matrix["values"], len(self.tasks), len(self.columns))

    @property
    def stages(self) -> int:
        return len(self.matrix["values"]) - 1

    def cell(self, stage: int, column: str) -> float:
        R = self.R
        return float(R[stage, self.columns.index(column)]) if stage <= self.stages else float("nan")

    def kl_to_base(self, stage: int) -> float:
        names = self.meta.get("stages") or self.tasks
        return _f(self.meta.get("kl_to_base", {}).get(f"{stage}:{names[stage - 1]}"))

    def offsets(self) -> dict[int, int]:
        """Optimizer steps before each stage (stage 1 starts at 0)."""
        out, total = {}, 0
        for k in range(1, self.stages + 1):
            out[k] = total
            total += self.steps.get(k, 0)
        out[self.stages + 1] = total
        return out


def validation_scores(run_dir: Path) -> dict[str, float]:
    """Each finished task's validation score at the checkpoint that ended it (``selection.json``; a
    two-phase method keeps it in its first phase's directory), by the stage's name."""
    out = {}
    for path in sorted(run_dir.glob("t*_*/train/**/selection.json")):
        sel = read_json(path)
        if sel.get("val") is not None:
            out[path.relative_to(run_dir).parts[0].split("_", 1)[1]] = float(sel["val"])
    return out


def load_run(run_dir: Path) -> Run:
    run = Run(run_dir, _overrides(run_dir), read_json(run_dir / "matrix.json"))
    names = run.meta.get("stages") or run.tasks
    for k, name in enumerate(names, start=1):
        stage_dir = run_dir / f"t{k:02d}_{name}"
        manifest = stage_dir / "train" / "manifest.json"
        if manifest.is_file():
            info = read_json(manifest)
            run.steps[k] = int(info.get("steps", 0))
        records = []
        for path in sorted((stage_dir / "train").glob("**/validation.jsonl")):
            records += read_jsonl(path)
        if records:
            run.periodic[k] = sorted(records, key=lambda r: r["step"])
    run.val = validation_scores(run_dir)
    for k in range(0, run.stages + 1):
        eval_dir = run_dir / ("t00_base" if k == 0 else f"t{k:02d}_{names[k - 1]}") / "eval"
        for column in run.columns:
            rows = read_jsonl(eval_dir / "predictions" / f"{column}.jsonl")
            if rows:
                run.items[(k, column)] = [float(r.get("score", 0.0)) for r in rows]
        if (eval_dir / "pass_at_k.json").is_file():
            run.pass_at_k[k] = {p["task"]: p["pass_at_k"] for p in read_json(eval_dir / "pass_at_k.json")}
        if (eval_dir / "drift.json").is_file():
            run.drift[k] = read_json(eval_dir / "drift.json")
    if (run_dir / "provenance.json").is_file():
        run.provenance = read_json(run_dir / "provenance.json")
    return run


def _is_order(override: str, runs: list[Run]) -> bool:
    """A ``task=[...]`` override that only reorders the same tasks as every other run's."""
    if _key(override) != ORDER_KEY:
        return False
    sets = {frozenset(r.tasks) for r in runs if r.curriculum == "sequential"}
    return len(sets) == 1


def group_label(run: Run, runs: list[Run], varying: set[str]) -> str:
    kept = [o for o in sorted(run.overrides) if _key(o) in varying]
    kept = [
        o for o in kept if _key(o) not in POOLED_KEYS and not _is_order(o, runs) and _key(o) != "curriculum"
    ]
    label = ",".join(kept) or f"method={run.method}"
    if run.curriculum != "sequential":
        label = f"reference {run.curriculum}: {label}"
    return label


@dataclass
class Sweep:
    root: Path
    runs: list[Run]

    @property
    def groups(self) -> dict[str, list[Run]]:
        out: dict[str, list[Run]] = {}
        for run in sorted(self.runs, key=lambda r: (r.label, r.order, r.seed)):
            out.setdefault(run.label, []).append(run)
        return out

    @property
    def sequential(self) -> dict[str, list[Run]]:
        return {g: rs for g, rs in self.groups.items() if rs[0].curriculum == "sequential"}

    def references(self, kind: str) -> list[Run]:
        return [r for r in self.runs if r.curriculum == kind]

    @property
    def tasks(self) -> list[str]:
        """The trained tasks, in the first sequential run's order."""
        seq = [r for r in self.runs if r.curriculum == "sequential"] or self.runs
        return seq[0].tasks

    @property
    def priors(self) -> list[str]:
        return self.runs[0].priors


def load_sweep(root: str | Path) -> Sweep:
    root = Path(root)
    if not root.is_dir():
        raise RunDirError(f"{root}: no such directory")
    runs = [load_run(m.parent) for m in sorted(root.rglob("matrix.json")) if ".hydra" not in m.parts]
    if not runs:
        raise RunDirError(f"{root}: no runs (no matrix.json below it)")
    values: dict[str, set[str]] = {}
    for run in runs:
        for o in run.overrides:
            values.setdefault(_key(o), set()).add(o)
    keys = [{_key(o) for o in r.overrides} for r in runs]
    varying = {k for k, v in values.items() if len(v) > 1 or any(k not in ks for ks in keys)}
    for run in runs:
        run.label = group_label(run, runs, varying)
    return Sweep(root, runs)


def run_metrics(run: Run) -> dict[str, float]:
    """The run's headline numbers at its last evaluated stage. A reference has no sequence: for a
    single-task run "new task" is the mean of R[k, task k] (each a model trained on that task alone) and
    the prior average the mean over its stages; for a joint run both are read from its one stage."""
    R, T = run.R, len(run.tasks)
    k = M.last_stage(R)
    nan = float("nan")
    if run.curriculum == "joint":
        out = {m: nan for m in METRICS}
        out.update(
            new_task=float(np.mean(R[1, :T])) if k >= 1 else nan, prior_avg=M.prior_avg(R, T, 1) if k else nan
        )
        out.update(acc=out["new_task"], prior_delta=M.prior_delta(R, T, 1) if k else nan, stage1=nan)
        return out
    diag = [R[j, j - 1] for j in range(1, min(k, T) + 1)]
    if run.curriculum == "single":
        out = {m: nan for m in METRICS}
        out["new_task"] = float(np.nanmean(diag)) if finite(diag) else nan
        out["prior_avg"] = float(np.mean([M.prior_avg(R, T, j) for j in range(1, k + 1)])) if k else nan
        out["prior_delta"] = float(np.mean([M.prior_delta(R, T, j) for j in range(1, k + 1)])) if k else nan
        out["stage1"] = nan
        return out
    out = {key: float(v) for key, v in M.summarize(R, T).items() if key in METRICS}
    out["new_task"] = float(np.nanmean(diag)) if finite(diag) else nan
    out["stage1"] = float(R[1, 0]) if k >= 1 else nan
    return out


def finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]
