"""Evaluation after every stage: probes, pass@k, the judge endpoint, the lm-eval prior suite."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from sdft_cli.config.checks import _choice, _nonneg, _positive
from sdft_cli.config.task import JudgeConfig, TaskConfig
from sdft_cli.errors import ConfigError


@dataclass
class PassAtKConfig:
    """pass@k by sampling (paper: temperature 1.0, top-p 0.95, k up to 128); empty ``k`` = off."""

    k: list[int] = field(default_factory=list)
    # Samples per prompt (n >= max k); the estimator is unbiased for every k <= n.
    n: int = 16
    temperature: float = 1.0
    top_p: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("eval.pass_at_k.n", self.n)
        if any(not 1 <= k <= self.n for k in self.k):
            raise ConfigError(f"eval.pass_at_k.k must lie in 1..n={self.n}, got {self.k}")
        _positive("eval.pass_at_k.temperature", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"eval.pass_at_k.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class BenchmarkConfig:
    """One lm-evaluation-harness benchmark, a prior-capability column of the matrix."""

    # An lm-eval task or group name (a group reports its own aggregate, e.g. mmlu's size-weighted acc).
    task: str = ""
    # The key of results[task] used as the score, "<metric>,<filter>".
    metric: str = "acc,none"
    # null = the task's default (the paper: task defaults, 0-shot for all six).
    num_fewshot: int | None = None


@dataclass
class PriorConfig:
    """Prior-capability benchmarks through lm-evaluation-harness on every stage's model (sdft_cli/prior.py).

    Choose a suite with ``eval/prior=paper``; each benchmark is a matrix column next to the probes.
    """

    # column name -> benchmark ({task, metric, num_fewshot}); empty = no lm-eval suite. Untyped in the
    # schema so that the command line can add one: '+eval.prior.benchmarks.arc={task: arc_easy}'.
    benchmarks: dict[str, Any] = field(default_factory=dict)
    # hf: the stage's in-memory model; vllm: the stage's checkpoint directory served by vLLM.
    backend: str = "hf"
    # Documents per task: a count (>= 1) or a fraction (< 1); null = all. For quick per-stage curves.
    limit: float | None = None
    # all: after every stage; ends: row 0 and the last stage only (the full suite is long).
    stages: str = "all"
    # 0 = lm-eval's "auto" (largest batch that fits; avoid on CPU).
    batch_size: int = 16
    # Directories of extra task YAMLs (local copies of benchmark data, custom tasks).
    include_path: list[str] = field(default_factory=list)
    apply_chat_template: bool = False
    # Tasks that execute model-written code (HumanEval) run only with this set (an explicit opt-in).
    confirm_run_unsafe_code: bool = False
    # Extra backend arguments, e.g. {gpu_memory_utilization: 0.5, max_model_len: 4096} for vllm.
    model_args: dict[str, Any] = field(default_factory=dict)
    seed: int = 1234

    def __post_init__(self) -> None:
        _choice("eval.prior.backend", self.backend, ("hf", "vllm"))
        _choice("eval.prior.stages", self.stages, ("all", "ends"))
        _nonneg("eval.prior.batch_size", self.batch_size)
        if self.limit is not None and not (0 < self.limit < 1 or float(self.limit).is_integer()):
            raise ConfigError(f"eval.prior.limit must be a count or a fraction in (0, 1), got {self.limit}")
        if self.limit is not None:
            _positive("eval.prior.limit", self.limit)
        self.benchmarks = {k: _benchmark(k, v) for k, v in self.benchmarks.items()}
        for name, bench in self.benchmarks.items():
            if "," not in bench.metric:
                raise ConfigError(
                    f"eval.prior.benchmarks.{name}.metric must be '<metric>,<filter>' as lm-eval reports "
                    f"it (e.g. 'acc,none'), got {bench.metric!r}"
                )
            if bench.num_fewshot is not None:
                _nonneg(f"eval.prior.benchmarks.{name}.num_fewshot", bench.num_fewshot)


@dataclass
class EvalConfig:
    """Greedy evaluation of every task's test split and of the prior-capability probes after every stage."""

    batch_size: int = 32
    # hf: transformers generate; vllm: the rollout engine (rollout.vllm.*) with the stage's weights pushed.
    backend: str = "hf"
    # Cap on items per task and probe (null = all); for quick per-stage curves.
    max_items: int | None = None
    probes: dict[str, TaskConfig] = field(default_factory=dict)
    # Weights dtype the evaluated model is cast to (auto = bf16 when compute runs in bf16), as a bf16
    # checkpoint would be served by vLLM or lm-eval.
    dtype: str = "auto"
    # After each task, the forward KL from the base model on that task's test prompts (RL's Razor's
    # forgetting predictor); keeps a copy of the base model in memory.
    kl_to_base: bool = True
    # Before training, the paper's Sec. 3.2 check per task: the base student's accuracy vs the
    # demonstration-conditioned teacher's, and the teacher's KL from the base (preconditions.json).
    preconditions: bool = False
    # The endpoint of the judge_* scorers (Medical, Knowledge acquisition).
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # After every stage, pass@k on each trained task's test split (pass_at_k.json next to results.json).
    pass_at_k: PassAtKConfig = field(default_factory=PassAtKConfig)
    # The lm-eval prior-capability suite (eval/prior=paper); its benchmarks are matrix columns.
    prior: PriorConfig = field(default_factory=PriorConfig)
    # After every stage, drift.json: the weights' distance from the base and from the stage's starting
    # model, and each column's greedy completion lengths and the model's entropy on them (sdft report).
    drift: bool = True
    # Evaluate every this many optimizer steps of a task, and at its last step (0 = only after each
    # task): records in the task's validation.jsonl and metrics.jsonl, each with its checkpoint.
    every_steps: int = 0
    # What a periodic evaluation scores: val (the task's validation split), test (every task's test
    # split), probes (the prior-capability probes). select=best_val reads val.
    periodic: list[str] = field(default_factory=lambda: ["val"])

    def __post_init__(self) -> None:
        _nonneg("eval.every_steps", self.every_steps)
        for what in self.periodic:
            _choice("eval.periodic", what, ("val", "test", "probes"))
        if not self.periodic:
            raise ConfigError("eval.periodic: name what a periodic evaluation scores (val, test, probes)")
        self.judge.check("eval.judge")
        _positive("eval.batch_size", self.batch_size)
        _choice("eval.backend", self.backend, ("hf", "vllm"))
        _choice("eval.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if self.max_items is not None:
            _positive("eval.max_items", self.max_items)


def _benchmark(name: str, value: Any) -> BenchmarkConfig:
    key = f"eval.prior.benchmarks.{name}"
    if isinstance(value, BenchmarkConfig):
        bench = value
    elif isinstance(value, dict):
        known = {f.name for f in fields(BenchmarkConfig)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{key}: unknown key(s) {unknown} (keys: {', '.join(sorted(known))})")
        bench = BenchmarkConfig(**value)
    else:
        raise ConfigError(f"{key} must be a mapping {{task, metric, num_fewshot}}, got {value!r}")
    if not bench.task:
        raise ConfigError(f"{key}.task: name the lm-eval task")
    return bench
