"""Rollout engines: what turns prompts into ``Rollouts`` from the current weights.

Every engine answers the same three calls (``Engine``): ``push`` the trained model's weights, ``generate``
completions, ``release`` memory until the next push. The implementations:

- ``HFEngine`` (hf.py): the model read in place, or an inference copy in the rollout dtype; the lean
  loop of ``decode.py`` for Llama-family models, transformers ``generate`` for the rest;
- ``DecoderEngine`` (hf.py): the lean loop over its own fused, packed copy, rebuilt at every push;
- ``VLLMEngine`` (vllm.py): a colocated vLLM engine, the weights pushed in memory;
- ``CheckpointEngine`` (vllm.py): a fresh vLLM engine from a saved student every ``sync_every`` pushes.

``Engines`` is the one factory: training (``for_training``) and evaluation (``for_eval``) both call it,
and it holds the one colocated vLLM engine a process starts (start-up takes minutes), shared by both.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from sdft_cli.config import RolloutConfig
from sdft_cli.engines.decode import supported
from sdft_cli.engines.hf import DecoderEngine, HFEngine, inference_copy
from sdft_cli.engines.vllm import CheckpointEngine, VLLMEngine, runs_remote_code
from sdft_cli.lora import merged_state
from sdft_cli.precision import inference_dtype
from sdft_cli.rollout import Rollouts, Sampling

__all__ = ["CheckpointEngine", "DecoderEngine", "Engine", "Engines", "HFEngine", "VLLMEngine"]


class Engine(Protocol):
    def push(self, model: torch.nn.Module) -> None:
        """Take ``model``'s current weights (after every optimizer step; before an evaluation)."""

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, progress: Callable[[int], None] | None = None
    ) -> Rollouts:
        """One completion per prompt, in the prompts' order."""

    def release(self) -> None:
        """Give back memory until the next ``push`` or ``generate`` (the trainer's turn)."""


def _dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _max_len(model: torch.nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 4096))


class Engines:
    """Builds the run's engines from ``rollout`` (backend, dtype, decoder, vLLM settings)."""

    def __init__(
        self,
        rollout: RolloutConfig,
        *,
        tokenizer,
        eos_ids: list[int],
        autocast_dtype: torch.dtype | None,
        seed: int,
        lora_rank: int = 0,
    ):
        """``lora_rank``: the run's model.lora.r; a colocated vLLM engine is started able to serve it."""
        self.rollout, self.tokenizer, self.eos_ids = rollout, tokenizer, eos_ids
        self.lora_rank = lora_rank if rollout.vllm.lora == "adapter" else 0
        self.amp, self.seed = autocast_dtype, seed
        self._colocated: VLLMEngine | None = None

    def _vllm_args(self, model: torch.nn.Module, dtype: torch.dtype) -> dict:
        return {
            "tokenizer": self.tokenizer,
            "eos_ids": self.eos_ids,
            "dtype": dtype,
            "seed": self.seed,
            "max_len": _max_len(model),
            # an instance of code shipped with its checkpoint exists only under model.trust_remote_code
            "trust_remote_code": runs_remote_code(model),
        }

    def _colocate(self, model: torch.nn.Module, dtype: torch.dtype, source: Path | str) -> VLLMEngine:
        if self._colocated is None:  # the architecture is read from `source`; weights are pushed
            args = self._vllm_args(model, dtype) | {"lora_rank": self.lora_rank}
            self._colocated = VLLMEngine(source, self.rollout, **args)
        return self._colocated

    def for_training(
        self,
        sampler: torch.nn.Module,
        *,
        device: torch.device,
        work_dir: Path,
        source_dir: Path | str | None,
        whole_copy: bool = False,
    ) -> Engine:
        """The rollout engine of one task's training. ``sampler`` is the model that samples (the student;
        the teacher for offline distillation); its weights reach the engine at each ``push``.

        ``work_dir``: the task's training directory (vLLM checkpoint mode saves the student there);
        ``source_dir``: a directory with the model's architecture for a new colocated vLLM engine;
        ``whole_copy``: every rank of a distributed run decodes with whole, unsharded weights.
        """
        dtype = inference_dtype(self.rollout.dtype, self.amp)
        if self.rollout.backend == "vllm":
            dtype = dtype or _dtype(sampler)
            if self.rollout.vllm.mode == "checkpoint":
                return CheckpointEngine(work_dir, self.rollout, **self._vllm_args(sampler, dtype))
            if source_dir is None:
                source_dir = work_dir / "rollout_model"
                sampler.save_pretrained(source_dir, state_dict=merged_state(sampler))
                self.tokenizer.save_pretrained(source_dir)
            return self._colocate(sampler, dtype, source_dir)
        own = dtype if dtype is not None else _dtype(sampler)
        if self.rollout.decoder == "auto" and supported(sampler) and (whole_copy or own != _dtype(sampler)):
            return DecoderEngine(own, self.tokenizer, self.eos_ids, self.amp)
        model = inference_copy(sampler, dtype, always=whole_copy).to(device)
        return HFEngine(model, self.tokenizer, self.eos_ids, self.amp, decoder=self.rollout.decoder)

    def for_eval(
        self, model: torch.nn.Module, *, backend: str = "hf", path: Path | str | None = None
    ) -> Engine:
        """Decoding for an evaluation of ``model`` (the stage's inference copy), its weights pushed:
        ``hf`` reads it in place, ``vllm`` is the colocated engine (started from ``path``, the
        checkpoint ``model`` was loaded from, when none runs yet)."""
        if backend == "vllm":
            if path is None:
                raise ValueError("a vLLM engine starts from the model's directory: pass its path")
            engine = self._colocate(model, _dtype(model), path)
            engine.push(model)
            return engine
        return HFEngine(model, self.tokenizer, self.eos_ids, self.amp)
