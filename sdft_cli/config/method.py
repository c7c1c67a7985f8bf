"""Training methods and their optimizer: every batch-size and objective key."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from omegaconf import MISSING

from sdft_cli.config.checks import _choice, _finite, _nonneg, _positive
from sdft_cli.config.task import TaskConfig
from sdft_cli.errors import ConfigError
from sdft_cli.names import DIVERGENCES, ESTIMATORS, SUPPORTS, teacher_template


@dataclass(frozen=True)
class DivergenceSpec:
    """The per-token objective as the loss code takes it (``divergence.py``); ``SDFTConfig.spec()``."""

    divergence: str = "forward"
    jsd_beta: float = 0.5
    support: str = "full"
    topk: int = 100
    topk_source: str = "teacher"
    topk_tail: str = "renorm"
    estimator: str = "analytic"
    temperature: float = 1.0

    def check(self) -> None:
        """Raise ValueError naming the field (the config layer prefixes ``method.``)."""
        choices = {
            "divergence": DIVERGENCES,
            "support": SUPPORTS,
            "estimator": ESTIMATORS,
            "topk_source": ("teacher", "student"),
            "topk_tail": ("renorm", "bucket"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if self.topk < 1:
            raise ValueError(f"topk must be > 0, got {self.topk}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.estimator in ("sampled", "rb") and self.divergence != "reverse":
            raise ValueError(f"estimator={self.estimator} estimates reverse KL; set divergence=reverse")
        if self.estimator == "sampled" and self.support != "full":
            raise ValueError("estimator=sampled uses only the sampled token; set support=full")

    @property
    def effective_divergence(self) -> str:
        """jsd at an end point is exactly one of the KLs."""
        if self.divergence == "jsd" and self.jsd_beta == 0.0:
            return "forward"
        if self.divergence == "jsd" and self.jsd_beta == 1.0:
            return "reverse"
        return self.divergence


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
    # A step whose loss or total gradient norm is NaN/inf: stop (an error naming the task, step and rows)
    # or skip (no optimizer or teacher update; counted in metrics.jsonl and the stage manifest).
    on_nonfinite: str = "stop"
    # With skip: this many consecutive skipped steps are allowed; one more stops the run.
    max_nonfinite_skips: int = 3
    # AdamW's two moments: fp32 (exact) or bf16 (stochastic rounding); 8 or 4 bytes per trained parameter
    # (sdft_cli/optim.py)
    moments: str = "fp32"

    def __post_init__(self) -> None:
        _positive("method.optim.lr", self.lr)
        _nonneg("method.optim.warmup_steps", self.warmup_steps)
        _choice("method.optim.schedule", self.schedule, ("cosine", "constant", "linear"))
        if not self.max_grad_norm > 0:  # NaN fails; inf is allowed and means no clipping
            raise ConfigError(f"method.optim.max_grad_norm must be > 0, got {self.max_grad_norm}")
        _positive("method.optim.eps", self.eps)
        _nonneg("method.optim.weight_decay", self.weight_decay)
        _choice("method.optim.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _choice("method.optim.moments", self.moments, ("fp32", "bf16"))
        _positive("method.optim.max_nonfinite_skips", self.max_nonfinite_skips)
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
    # Keep only the last this-many tokens of every training context (student prompt, teacher context,
    # the prompt a rollout continues): the official code's left truncation at max_prompt_length=1024,
    # which cuts the start (tool documentation, system prompt) of long contexts. null = never truncate:
    # a context too long for the model is refused before any work. Evaluation contexts are never cut.
    max_prompt_tokens: int | None = None
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
        if self.max_prompt_tokens is not None:
            _positive("method.max_prompt_tokens", self.max_prompt_tokens)
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
    # Where an ema or frozen teacher starts each task: current (the student as the task starts; the paper)
    # or base (the run's base model, whose in-context ability earlier tasks have not changed).
    teacher_init: str = "current"
    # How an ema or frozen teacher is held: copy (an fp32 copy of the weights), offset (a bf16 offset
    # from the student, half the memory, updated inside the optimizer step) or cpu (the fp32 copy in host
    # memory on a GPU run, streamed to the GPU module by module for its forward; teacher.py)
    teacher_storage: str = "copy"
    # Compute precision of the teacher's scoring forward (no gradient flows through it): auto = that of
    # the student (model.precision); bf16 scores under bf16 autocast while the student trains in fp32.
    teacher_precision: str = "auto"
    # Who samples the completions: student (on-policy, SDFT) or teacher (offline distillation).
    generate_from: str = "student"
    # Completions sampled per prompt (per step; with teacher_samples=fixed, per prompt in the set). The
    # paper samples one (App. B.1) and found more gave negligible gains (App. A.1). A step's sequences
    # are prompts_per_step x rollouts_per_prompt, the mean over all of them (seq_mean) or their tokens.
    rollouts_per_prompt: int = 1
    # With generate_from=teacher: fresh = the teacher samples every step's completions anew (the official
    # code's generate_from_teacher); fixed = it samples each training prompt's completions once, before
    # the task's first step, and every epoch trains on that set (the paper's Fig. 6 offline
    # distillation, a KL loss on a fixed dataset of teacher outputs; train/teacher_set/).
    teacher_samples: str = "fresh"
    # Truncated importance weight per sequence, mean over its loss tokens of min(p_train/p_sampler, cap):
    # auto = on when rollouts come from another engine than the trainer (vLLM), off for the hf backend.
    importance_sampling: str = "auto"
    is_cap: float = 2.0
    # Also write the task's final teacher weights (teacher.safetensors) next to the student.
    save_teacher: bool = False
    # A name from sdft_cli.names.TEACHER_TEMPLATES or a literal template with {prompt} and {demonstration}.
    # null = each task's own teacher_template, else "paper". Set here, it applies to every task.
    teacher_template: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("method.temperature", self.temperature)
        _finite("method.jsd_beta", self.jsd_beta)
        try:
            self.spec().check()  # the objective's own rules, one place
        except ValueError as e:
            raise ConfigError(f"method.{e}") from None
        _choice("method.teacher", self.teacher, ("ema", "frozen", "live"))
        _choice("method.teacher_precision", self.teacher_precision, ("auto", "fp32", "bf16"))
        _choice("method.generate_from", self.generate_from, ("student", "teacher"))
        _positive("method.rollouts_per_prompt", self.rollouts_per_prompt)
        _choice("method.teacher_samples", self.teacher_samples, ("fresh", "fixed"))
        if self.teacher_samples == "fixed" and self.generate_from != "teacher":
            raise ConfigError(
                "method.teacher_samples=fixed is a set of the teacher's outputs; it needs "
                "method.generate_from=teacher (the student's samples are on-policy, drawn every step)"
            )
        if self.teacher_samples == "fixed" and self.teacher != "frozen":
            raise ConfigError(
                "method.teacher_samples=fixed: the set is sampled once by the teacher the task starts with, "
                f"and that teacher scores it (method.teacher=frozen, not {self.teacher})"
            )
        _choice("method.importance_sampling", self.importance_sampling, ("auto", "on", "off"))
        if self.importance_sampling == "on" and self.generate_from == "teacher":
            raise ConfigError(
                "method.importance_sampling=on corrects the student's own samples; with "
                "method.generate_from=teacher (offline distillation) it is off"
            )
        _nonneg("method.skip_first_tokens", self.skip_first_tokens)
        if self.teacher_template is not None:
            teacher_template(self.teacher_template, "method.teacher_template")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ConfigError(f"method.ema_alpha must be in (0, 1], got {self.ema_alpha}")
        _choice("method.teacher_storage", self.teacher_storage, ("copy", "offset", "cpu"))
        _choice("method.teacher_init", self.teacher_init, ("current", "base"))
        if self.teacher_init == "base" and (self.teacher == "live" or self.teacher_storage == "offset"):
            raise ConfigError(
                "method.teacher_init=base starts an ema or frozen teacher held as a copy (method.teacher="
                f"{self.teacher}, method.teacher_storage={self.teacher_storage})"
            )
        if self.teacher_storage != "copy" and (self.teacher == "live" or self.generate_from == "teacher"):
            raise ConfigError(
                f"method.teacher_storage={self.teacher_storage} holds an ema or frozen teacher that scores "
                f"the student's samples (method.teacher={self.teacher}, "
                f"method.generate_from={self.generate_from})"
            )
        if not 1.0 <= self.is_cap < float("inf"):  # NaN fails too
            raise ConfigError(f"method.is_cap must be >= 1 and finite, got {self.is_cap}")

    def spec(self) -> DivergenceSpec:
        """The per-token objective as the loss code takes it (same field names)."""
        return DivergenceSpec(**{f.name: getattr(self, f.name) for f in fields(DivergenceSpec)})


@dataclass
class OfflineDistillConfig(SDFTConfig):
    """The same divergence on completions the (frozen, demonstration-conditioned) teacher samples."""

    name: str = "offline_distill"
    generate_from: str = "teacher"
    teacher: str = "frozen"
    teacher_samples: str = "fixed"


@dataclass
class SFTConfig(MethodConfig):
    """Supervised fine-tuning: next-token NLL on the demonstrations (off-policy baseline)."""

    name: str = "sft"
    # none = plain NLL; prob = each token's NLL weighted by its detached probability (DFT).
    token_weighting: str = "none"
    # token_mean: one mean over all demonstration tokens of the optimizer step, as TRL's SFTTrainer (the
    # paper's SFT) normalises; seq_mean: each sequence's token mean, then the mean over sequences.
    aggregation: str = "token_mean"
    # What the student imitates: the dataset's demonstrations, or teacher = one completion per training
    # prompt sampled once by the demonstration-conditioned model the task starts from (the paper's Fig. 6
    # "SFT from the teacher"; train/teacher_set/, sampled with rollout.*).
    targets: str = "demonstrations"
    # The teacher context for targets=teacher (as method=sdft's: null = each task's own, else "paper").
    teacher_template: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _choice("method.token_weighting", self.token_weighting, ("none", "prob"))
        _choice("method.targets", self.targets, ("demonstrations", "teacher"))
        if self.teacher_template is not None:
            teacher_template(self.teacher_template, "method.teacher_template")


@dataclass
class SFTTeacherConfig(SFTConfig):
    """SFT on the teacher's outputs (paper Fig. 6): the NLL of completions the demonstration-conditioned
    model sampled once, before the task's first step, instead of the dataset's demonstrations."""

    name: str = "sft_teacher"
    targets: str = "teacher"


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
