"""Prior capabilities through lm-evaluation-harness: each benchmark of ``eval.prior`` is a matrix column.

The paper measured forgetting with lm-eval on its task defaults (paper.md Sec. 5), so the same harness,
task names and metric keys make our "Avg." comparable with its tables. The hf backend evaluates the
stage's in-memory model (no save and reload); vllm serves the stage's checkpoint directory. The raw
lm-eval results are kept as ``lm_eval.json`` in the evaluation stage, so a stage interrupted after the
suite does not run it again.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdft_cli.artifacts import atomic_write_json, read_json
from sdft_cli.config import PriorConfig
from sdft_cli.errors import ConfigError, DataError

RESULTS = "lm_eval.json"


def runs_at(cfg: PriorConfig, stage: int, last_stage: int) -> bool:
    """Whether the suite runs after ``stage`` (row 0 is stage 0)."""
    return bool(cfg.benchmarks) and (cfg.stages == "all" or stage in (0, last_stage))


def task_manager(cfg: PriorConfig):
    """lm-eval's task index (its built-in tasks plus ``include_path``); importing it takes seconds."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(
            "eval.prior needs lm-evaluation-harness: pip install 'lm-eval[hf]' (see docs/install.md)"
        ) from None
    paths = [Path(p).expanduser() for p in cfg.include_path]
    for p in paths:
        if not p.is_dir():
            raise ConfigError(f"eval.prior.include_path: no directory {p}")
    return _index(TaskManager, tuple(str(p.resolve()) for p in paths))


@functools.lru_cache(maxsize=4)
def _index(task_manager_cls, paths: tuple[str, ...]):
    """One index per set of include paths per process: building it reads every task YAML (~10 s)."""
    return task_manager_cls(include_path=list(paths) or None)


def _leaves(tm, name: str, seen: set[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(task name, YAML config) of every task below a task, group or tag name."""
    from lm_eval.tasks._index import Kind

    seen = set() if seen is None else seen
    if name in seen:
        return
    seen.add(name)
    entry = tm.task_index.get(name)
    if entry is None:
        return
    cfg = entry.cfg or {}
    if entry.kind == Kind.GROUP:
        for child in cfg.get("task", []):
            yield from _leaves(tm, child if isinstance(child, str) else child.get("task", ""), seen)
    elif entry.kind == Kind.TAG:
        for child in entry.tags:
            yield from _leaves(tm, child, seen)
    else:
        yield name, cfg


def check(cfg: PriorConfig, trust_remote_code: bool = False):
    """Before any model is loaded: every benchmark names a known lm-eval task, a suite that would execute
    model-written code (HumanEval) has the explicit opt-in, and the model's own code is trusted only
    through ``model.trust_remote_code``. Returns the task manager (None: no suite)."""
    if not cfg.benchmarks:
        return None
    if "trust_remote_code" in cfg.model_args and cfg.model_args["trust_remote_code"] != trust_remote_code:
        raise ConfigError(
            "eval.prior.model_args.trust_remote_code: set model.trust_remote_code instead (it applies to "
            "every load of the model)"
        )
    tm = task_manager(cfg)
    for name, bench in cfg.benchmarks.items():
        key = f"eval.prior.benchmarks.{name}"
        if bench.task not in tm.task_index:
            raise ConfigError(f"{key}.task: lm-eval has no task, group or tag {bench.task!r}")
        unsafe = sorted(t for t, c in _leaves(tm, bench.task) if c.get("unsafe_code"))
        if unsafe and not cfg.confirm_run_unsafe_code:
            raise ConfigError(
                f"{key}: lm-eval task(s) {', '.join(unsafe)} execute model-written code; set "
                f"eval.prior.confirm_run_unsafe_code=true to run them, or drop the column with "
                f"'~{key}'"
            )
    return tm


def _limit(cfg: PriorConfig) -> int | float | None:
    if cfg.limit is None:
        return None
    return int(cfg.limit) if float(cfg.limit).is_integer() else float(cfg.limit)


def _json(obj: Any) -> Any:
    """lm-eval's results hold callables and numpy values: keep what JSON can say, as strings otherwise."""
    return json.loads(json.dumps(obj, default=str))


def run_suite(
    cfg: PriorConfig, tm, model, tokenizer, *, path: Path, dtype: str, trust_remote_code: bool = False
) -> dict:
    """Run every benchmark on one model; one lm-eval call per distinct ``num_fewshot``."""
    import lm_eval

    if cfg.confirm_run_unsafe_code:
        os.environ.setdefault("HF_ALLOW_CODE_EVAL", "1")  # HF Evaluate's code_eval asks for it as well
    batch = cfg.batch_size or "auto"
    if cfg.backend == "hf":
        from lm_eval.models.huggingface import HFLM

        args = {**cfg.model_args, "trust_remote_code": trust_remote_code}
        lm: Any = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch, **args)
        model_args = None
    else:
        lm = "vllm"
        model_args = {
            "pretrained": str(path),
            "tokenizer": str(path),
            "dtype": dtype,
            **cfg.model_args,
            "trust_remote_code": trust_remote_code,
        }
    by_shots: dict[int | None, list[str]] = {}
    for bench in cfg.benchmarks.values():
        tasks = by_shots.setdefault(bench.num_fewshot, [])
        if bench.task not in tasks:
            tasks.append(bench.task)
    merged: dict[str, dict] = {"results": {}, "n-samples": {}, "n-shot": {}, "versions": {}, "configs": {}}
    for shots, tasks in by_shots.items():
        out = lm_eval.simple_evaluate(
            model=lm,
            model_args=model_args,
            tasks=tasks,
            num_fewshot=shots,
            batch_size=batch,
            limit=_limit(cfg),
            log_samples=False,
            task_manager=tm,
            apply_chat_template=cfg.apply_chat_template,
            confirm_run_unsafe_code=cfg.confirm_run_unsafe_code,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
        if out is None:  # pragma: no cover - only non-zero ranks of a distributed run get None
            raise DataError("lm-eval returned no results")
        for key in merged:
            merged[key].update(out.get(key) or {})
        merged["lm_eval_version"] = out.get("lm_eval_version")
    return _json(merged)


def cells(cfg: PriorConfig, results: dict, stage: int, stage_task: str) -> list[dict]:
    """Matrix cells (kind ``prior``) from lm-eval results, one per benchmark."""
    out = []
    for name, bench in cfg.benchmarks.items():
        scores = results["results"].get(bench.task, {})
        if bench.metric not in scores:
            have = sorted(k for k in scores if "," in k and "_stderr" not in k)
            raise DataError(
                f"eval.prior.benchmarks.{name}.metric: lm-eval reported no {bench.metric!r} for "
                f"{bench.task} (it has: {', '.join(have) or 'nothing'})"
            )
        metric, _, filt = bench.metric.partition(",")
        stderr = scores.get(f"{metric}_stderr,{filt}")
        n = results["n-samples"].get(bench.task, {}).get("effective")
        out.append(
            {
                "stage": stage,
                "stage_task": stage_task,
                "eval_task": name,
                "kind": "prior",
                "metric": bench.metric,
                "value": float(scores[bench.metric]),
                "n": n,
                "stderr": stderr if isinstance(stderr, (int, float)) else None,
            }
        )
    return out


def evaluate(
    cfg: PriorConfig,
    tm,
    model,
    tokenizer,
    *,
    path: Path,
    dtype: str,
    out_dir: Path,
    stage: int,
    stage_task: str,
    trust_remote_code: bool = False,
) -> list[dict]:
    """The suite's cells for one stage, reusing the stage's ``lm_eval.json`` when a run left one."""
    cached = out_dir / RESULTS
    if cached.is_file():
        results = read_json(cached)
    else:
        results = run_suite(
            cfg, tm, model, tokenizer, path=path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        atomic_write_json(cached, results)
    return cells(cfg, results, stage, stage_task)
