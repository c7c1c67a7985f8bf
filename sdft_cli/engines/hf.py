"""Engines on in-process weights: transformers ``generate``, or the lean decode loop of ``decode.py``.

``HFEngine`` generates from a model read in place: the student itself, or an inference copy in the
rollout dtype whose weights are copied from the student by ``push``. ``DecoderEngine`` holds its own
fused (and, on CPUs, oneDNN-packed) copy, rebuilt by every ``push`` and dropped by ``release`` so that
it is not resident while the trainer holds its gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from sdft_cli import distributed
from sdft_cli.engines.decode import Decoder, decoder_for
from sdft_cli.precision import autocast
from sdft_cli.rollout import Rollouts, Sampling, assemble, left_pad


class HFEngine:
    """Generation from ``model``'s own weights: the lean loop for the architectures it reproduces
    (``decoder="auto"``), else transformers ``generate``."""

    def __init__(self, model, tokenizer, eos_ids: list[int], autocast_dtype=None, decoder: str = "auto"):
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.autocast_dtype, self.decoder = autocast_dtype, decoder

    def push(self, model) -> None:
        copy_weights(self.model, model)

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, progress: Callable[[int], None] | None = None
    ) -> Rollouts:
        lean = decoder_for(self.model) if self.decoder == "auto" else None
        if lean is not None:  # bound to the model: reads its weights in place
            with autocast(self.autocast_dtype, lean.device):
                return generate_lean(lean, self.tokenizer, prompts, sampling, self.eos_ids, progress)
        return generate_transformers(
            self.model,
            self.tokenizer,
            prompts,
            sampling,
            self.eos_ids,
            autocast_dtype=self.autocast_dtype,
            progress=progress,
        )

    def release(self) -> None:
        pass


class DecoderEngine:
    """The lean loop over its own copy of the weights in ``dtype``, built from the model by ``push``."""

    def __init__(self, dtype: torch.dtype, tokenizer, eos_ids: list[int], autocast_dtype=None):
        self.dtype, self.tokenizer, self.eos_ids = dtype, tokenizer, eos_ids
        self.autocast_dtype = autocast_dtype
        self.decoder: Decoder | None = None

    def push(self, model) -> None:
        if self.decoder is None:
            self.decoder = Decoder.detached(model, self.dtype)
        else:
            self.decoder.push(model)

    def generate(
        self, prompts: list[list[int]], sampling: Sampling, progress: Callable[[int], None] | None = None
    ) -> Rollouts:
        if self.decoder is None:
            raise RuntimeError("push the weights before generating")
        with autocast(self.autocast_dtype, self.decoder.device):
            return generate_lean(self.decoder, self.tokenizer, prompts, sampling, self.eos_ids, progress)

    def release(self) -> None:
        """Drop the copy until the next ``push`` (which rebuilds it anyway)."""
        if self.decoder is not None:
            self.decoder.release()


class _TokenLogprobs:
    """A logits processor that records the log-probability of each token ``generate`` samples.

    Placed before the temperature/top-p warpers, it sees the model's logits at step k; the token chosen
    at step k is visible at step k+1 (or in the returned sequences, for the last step), so one
    ``[batch, vocab]`` row per step is held, never the whole ``[batch, steps, vocab]``.
    """

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.pending: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    def take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.out.append(self.pending.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).float())
            self.pending = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores


@torch.inference_mode()
def generate_transformers(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_ids: list[int],
    *,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> Rollouts:
    """One completion per prompt (sampled, or greedy at temperature 0) with transformers ``generate``
    and its KV cache, in batches of prompts of similar length."""
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # buckets of similar length
    outs: dict[int, torch.Tensor] = {}
    lps: dict[int, torch.Tensor] = {}

    greedy = sampling.temperature == 0
    gen = GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else sampling.top_k,
        max_new_tokens=sampling.max_new_tokens,
        min_new_tokens=sampling.min_new_tokens or None,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        use_cache=True,
    )
    # generate() fills every unset field from the model's own generation_config (Qwen ships a
    # repetition_penalty of 1.05, many models a top-k of 50); a bare one during the call makes it sample
    # from exactly the configured distribution.
    was_training, saved_config = model.training, model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=saved_config.bos_token_id, eos_token_id=eos_ids, pad_token_id=pad_id
    )
    model.eval()
    try:
        for start in range(0, len(order), sampling.batch_size):
            idx = order[start : start + sampling.batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], pad_id)
            recorder = _TokenLogprobs(sampling.temperature) if sampling.logprobs else None
            with autocast(autocast_dtype, device):
                seq = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen,
                    logits_processor=LogitsProcessorList([recorder] if recorder else []),
                )
            if recorder is not None:
                recorder.take(seq[:, -1])
                batch_lp = torch.stack(recorder.out, dim=1).cpu() if recorder.out else None  # one transfer
            for row, i in enumerate(idx):
                outs[i] = seq[row, ids.shape[1] :].cpu()
                if recorder is not None and batch_lp is not None:
                    lps[i] = batch_lp[row]
            if progress is not None:
                progress(len(idx))
    finally:
        model.train(was_training)
        model.generation_config = saved_config
    seqs = [outs[i] for i in range(len(prompts))]
    return assemble(
        prompts,
        seqs,
        [lps.get(i, torch.zeros(0)) for i in range(len(prompts))] if sampling.logprobs else None,
        tokenizer,
        eos_ids,
    )


@torch.inference_mode()
def generate_lean(
    dec: Decoder,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_ids: list[int],
    progress: Callable[[int], None] | None = None,
) -> Rollouts:
    """``generate_transformers`` on the lean loop of ``decode.py`` (same distribution, own stream)."""
    bound = dec.owned_dtype is None
    was_training = bound and dec.model.training
    if was_training:  # a bound loop calls the model's LoRA layers: no adapter dropout while sampling
        dec.model.eval()
    try:
        return _generate_lean(dec, tokenizer, prompts, sampling, eos_ids, progress)
    finally:
        if was_training:
            dec.model.train()


def _generate_lean(dec, tokenizer, prompts, sampling, eos_ids, progress) -> Rollouts:
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: list[torch.Tensor | None] = [None] * len(prompts)
    lps: list[torch.Tensor] = [torch.zeros(0)] * len(prompts)
    for start in range(0, len(order), sampling.batch_size):
        idx = order[start : start + sampling.batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        new, lp = dec.generate(ids.to(dec.device), mask.to(dec.device), sampling, eos_ids, pad_id)
        new, lp = new.cpu(), (lp.cpu() if lp is not None else None)
        for row, i in enumerate(idx):
            outs[i] = new[row]
            if lp is not None:
                lps[i] = lp[row]
        if progress is not None:
            progress(len(idx))
    return assemble(prompts, outs, lps if sampling.logprobs else None, tokenizer, eos_ids)


def inference_copy(model, dtype: torch.dtype | None, always: bool = False):
    """The model generation runs on: the model itself, or a frozen copy in ``dtype`` (``always``: a copy
    even in the model's dtype, as every rank of a distributed run needs whole weights to decode).

    Decoding on a CPU reads every weight once per token, so bf16 weights decode ~1.6x faster than fp32
    (2-core CPU, SmolLM2-135M, 8 x 48 tokens: 4.4-4.8 s vs 7.5 s). Like a vLLM engine, the copy's
    weights are synced from the student after every optimizer step (``copy_weights``).
    """
    if not always and (dtype is None or dtype == next(model.parameters()).dtype):
        return model
    copy_ = copy.deepcopy(model).to(dtype or next(model.parameters()).dtype)
    copy_.requires_grad_(False)
    copy_.eval()
    return copy_


@torch.no_grad()
def copy_weights(engine, student) -> None:
    """Copy the student's current weights into an inference copy (a no-op when they are the same model)."""
    if engine is student:
        return
    params = list(student.named_parameters())
    if any(hasattr(p, "full_tensor") for _, p in params):  # sharded: gather one tensor at a time
        for (name, e), (twin, p) in zip(engine.named_parameters(), params, strict=True):
            assert name == twin, f"inference copy and student differ: {name} vs {twin}"
            e.copy_(distributed.full(p.detach()))
        return
    torch._foreach_copy_(list(engine.parameters()), [p.detach() for _, p in params])
