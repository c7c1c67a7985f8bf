"""Typed config schemas: "what can I configure", one module per area (model, method, task,
evaluation), the run-level ``Config`` here.

Values live in ``conf/`` YAML; these schemas are registered in Hydra's ConfigStore under
``schema/...`` (``compose.register_configs``) and every YAML option extends one through its defaults
list, so a wrong key or a wrong type fails at composition with the key's full name. ``__post_init__``
checks values. Below ``compose.to_config`` only these dataclasses exist; stage functions take the
narrowest slice they need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from sdft_cli.config.checks import _choice, _finite, _nonempty, _nonneg, _positive
from sdft_cli.config.credentials import check_no_literal_secrets
from sdft_cli.config.evaluation import BenchmarkConfig, EvalConfig, PassAtKConfig, PriorConfig
from sdft_cli.config.method import (
    DFTConfig,
    DivergenceSpec,
    MethodConfig,
    OfflineDistillConfig,
    OptimConfig,
    ReinvokeConfig,
    SDFTConfig,
    SFTConfig,
    SFTReinvokeConfig,
    SFTTeacherConfig,
)
from sdft_cli.config.model import LoraConfig, ModelConfig, TinyModelConfig, ToyWorldConfig
from sdft_cli.config.task import ColumnsConfig, EndpointConfig, JudgeConfig, KnowledgeConfig, TaskConfig
from sdft_cli.errors import ConfigError
from sdft_cli.names import METHODS

__all__ = [
    "BenchmarkConfig",
    "ColumnsConfig",
    "Config",
    "DFTConfig",
    "DistConfig",
    "DivergenceSpec",
    "EndpointConfig",
    "EvalConfig",
    "JudgeConfig",
    "KnowledgeConfig",
    "LoggerConfig",
    "MethodConfig",
    "LoraConfig",
    "ModelConfig",
    "OfflineDistillConfig",
    "OptimConfig",
    "PassAtKConfig",
    "PriorConfig",
    "ReinvokeConfig",
    "RolloutConfig",
    "SDFTConfig",
    "SFTConfig",
    "SFTReinvokeConfig",
    "SFTTeacherConfig",
    "TaskConfig",
    "TinyModelConfig",
    "ToyWorldConfig",
    "VLLMConfig",
]


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (``rollout.backend=vllm``, sdft_cli/vllm_engine.py)."""

    # colocate: one engine in this process, the student's weights pushed in memory after every step;
    # checkpoint: a fresh engine from the student saved every `sync_every` steps (robust, slower).
    mode: str = "colocate"
    sync_every: int = 1
    # Share of the GPU's memory for the engine (weights + KV cache); the official code uses 0.3.
    gpu_memory_utilization: float = 0.3
    # Offload the engine's weights and free its KV cache while the trainer runs (GPU only).
    sleep: bool = True
    tensor_parallel_size: int = 1
    # null = the model's context (model.max_context).
    max_model_len: int | None = None
    enforce_eager: bool = False
    # KV cache of the CPU build, GiB (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = 2
    # A LoRA student (model.lora.r > 0) in colocate mode: adapter = push only the adapter after each step
    # (vLLM's own LoRA; the base weights once per task); merged = fold it in and push every weight.
    lora: str = "adapter"

    def check(self) -> None:
        _choice("rollout.vllm.mode", self.mode, ("colocate", "checkpoint"))
        _choice("rollout.vllm.lora", self.lora, ("adapter", "merged"))
        _positive("rollout.vllm.sync_every", self.sync_every)
        _positive("rollout.vllm.tensor_parallel_size", self.tensor_parallel_size)
        _positive("rollout.vllm.cpu_kv_cache_gib", self.cpu_kv_cache_gib)
        _finite("rollout.vllm.gpu_memory_utilization", self.gpu_memory_utilization)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(
                f"rollout.vllm.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.tensor_parallel_size > 1 and self.mode == "colocate":
            raise ConfigError(
                "rollout.vllm.tensor_parallel_size > 1 needs rollout.vllm.mode=checkpoint (the in-memory "
                "weight push runs the engine in this process)"
            )
        if self.mode == "colocate" and self.sync_every != 1:
            raise ConfigError(
                "rollout.vllm.sync_every applies to mode=checkpoint (colocate syncs every step)"
            )


@dataclass
class RolloutConfig:
    """How the student samples its on-policy completions."""

    backend: str = "hf"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # null = the task's max_new_tokens.
    max_new_tokens: int | None = None
    # Suppress end-of-sequence before this many tokens: every completion as long as the cap when equal to
    # it (benchmarks that need a fixed amount of work per step; completions are then run-on text).
    min_new_tokens: int = 0
    # Prompts per generate() call.
    batch_size: int = 32
    # Weights dtype of the generation copy, synced from the student every step: auto = bf16 when the
    # compute precision is bf16 (decoding is bound by reading weights), else the student itself.
    dtype: str = "auto"
    # backend hf: auto = sdft_cli.decode's KV-cache loop for Llama/Mistral/Qwen2/Qwen3 (fused, oneDNN-packed
    # weights on CPUs), transformers generate for other architectures; generate = always generate.
    decoder: str = "auto"
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self) -> None:
        _choice("rollout.backend", self.backend, ("hf", "vllm"))
        self.vllm.check()
        _choice("rollout.dtype", self.dtype, ("auto", "float32", "bfloat16"))
        _choice("rollout.decoder", self.decoder, ("auto", "generate"))
        _nonneg("rollout.temperature", self.temperature)
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        _nonneg("rollout.top_k", self.top_k)
        _nonneg("rollout.min_new_tokens", self.min_new_tokens)
        _positive("rollout.batch_size", self.batch_size)
        if self.max_new_tokens is not None:
            _positive("rollout.max_new_tokens", self.max_new_tokens)
            if self.min_new_tokens > self.max_new_tokens:
                raise ConfigError(
                    f"rollout.min_new_tokens ({self.min_new_tokens}) exceeds rollout.max_new_tokens "
                    f"({self.max_new_tokens})"
                )


@dataclass
class DistConfig:
    """Multi-process training (FSDP2, sdft_cli/distributed.py). Active when a launcher starts several
    processes (torchrun, accelerate, a Slurm step with several tasks); these only tune it."""

    # auto = nccl on CUDA, gloo on the CPU.
    backend: str = "auto"
    # How long a rank waits in a collective. Ranks > 0 wait while rank 0 evaluates, so this must exceed
    # the longest evaluation stage.
    timeout_min: int = 360
    # Free each block's gathered weights after its forward (ZeRO-3); false keeps them until the
    # backward (less communication, more memory).
    reshard_after_forward: bool = True

    def __post_init__(self) -> None:
        _choice("dist.backend", self.backend, ("auto", "nccl", "gloo"))
        _positive("dist.timeout_min", self.timeout_min)


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
    dist: DistConfig = field(default_factory=DistConfig)
    # The checkpoint that ends each task and starts the next: last, or best_val (the highest score on
    # the task's validation split among the periodic evaluations, eval.every_steps; never the test).
    select: str = "last"
    # How the tasks are trained: sequential (the curriculum, each task from the previous task's model);
    # single (each task alone from the base model: the single-task reference of intransigence); joint
    # (one stage on every task's training rows at once: the multi-task ceiling). sdft report reads all three.
    curriculum: str = "sequential"

    def __post_init__(self) -> None:
        if self.model.source == "hf" and not self.model.path:
            raise ConfigError("model.path must be set when model.source=hf (a hub id or a local directory)")
        if not isinstance(self.method, MethodConfig):
            raise ConfigError("method must be one of: " + ", ".join(METHODS))
        if self.method.name != type(self.method).name:
            # the name picks the training loop; the schema was picked by method=<option>
            raise ConfigError(
                f"method.name={self.method.name!r} does not match the chosen method "
                f"({type(self.method).name}); choose a method with method=<name> ({', '.join(METHODS)})"
            )
        _nonempty("run_dir", self.run_dir)
        _nonempty("name", self.name)
        if self.threads is not None:
            _positive("threads", self.threads)
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
        _choice("select", self.select, ("last", "best_val"))
        if self.select == "best_val" and self.model.lora.r:
            raise ConfigError("select=best_val keeps full weights; with model.lora use select=last")
        _choice("curriculum", self.curriculum, ("sequential", "single", "joint"))
        if self.select == "best_val" or (self.eval.every_steps and "val" in self.eval.periodic):
            why = "select=best_val" if self.select == "best_val" else "eval.periodic=[val, ...]"
            if self.select == "best_val" and not self.eval.every_steps:
                raise ConfigError("select=best_val chooses among periodic evaluations: set eval.every_steps")
            if self.select == "best_val" and "val" not in self.eval.periodic:
                raise ConfigError("select=best_val reads the validation score: put val in eval.periodic")
            for name, task in self.task.items():
                if not task.has_validation:
                    raise ConfigError(
                        f"{why} needs a validation split: set task.{name}.val_split or "
                        f"task.{name}.val_fraction"
                    )
        columns = [*self.task, *self.eval.probes, *self.eval.prior.benchmarks]
        overlap = sorted({c for c in columns if columns.count(c) > 1})
        if overlap:
            raise ConfigError(f"task, eval.probes and eval.prior.benchmarks share names: {overlap}")
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        check_no_literal_secrets("", self)
