"""Rollout generation: the current student samples completions from the student context.

``generate`` is batched (prompts are length-sorted into buckets and left-padded, so each bucket
wastes little padding) and uses the KV cache of transformers ``generate``. The same function does
greedy decoding for evaluation. Backends are picked by name from ``ROLLOUT_BACKENDS``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdft_cli import distributed
from sdft_cli.decode import Decoder, decoder_for, supported
from sdft_cli.models import autocast


@dataclass(frozen=True)
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32
    # Record each sampled token's log-probability under the sampler (for importance weights).
    logprobs: bool = False
    # End-of-sequence is suppressed before this many tokens (benchmarks: a fixed amount of work).
    min_new_tokens: int = 0
    # auto: the lean loop of sdft_cli.decode for the architectures it knows, else transformers generate.
    decoder: str = "auto"


@dataclass
class Rollouts:
    """Completions for a list of prompts, in the prompts' order.

    ``completion_ids`` is right-padded with ``pad_id``; ``completion_mask`` is 1 on every generated
    token up to and including the first EOS, 0 after it. ``logprobs`` (when requested) is the
    sampler's log-probability of each completion token: log-softmax of the engine's logits divided by
    the sampling temperature (top-p/top-k truncation not applied, as the trainer computes it).
    """

    prompt_ids: list[list[int]]
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    texts: list[str]
    truncated: list[bool]
    logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> list[int]:
        return self.completion_mask.sum(-1).tolist()


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def completion_mask(
    completions: torch.Tensor, eos_ids: list[int], lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask up to and including the first EOS within each row's ``lengths`` (default: the full width).

    Also returns, per row, whether it ended without an EOS (cut by its length cap).
    """
    width = completions.shape[-1]
    valid = torch.ones_like(completions, dtype=torch.bool)
    if lengths is not None:
        valid = torch.arange(width, device=completions.device) < lengths.unsqueeze(-1)
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device)) & valid
    # number of EOS seen strictly before each position; a token counts while none has been seen
    before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    mask = ((before == 0) & valid).long()
    truncated = ~is_eos.any(dim=-1)
    return mask, truncated


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
def generate_hf(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_ids: list[int],
    autocast_dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
) -> Rollouts:
    """Sample (or greedily decode) one completion per prompt from in-process weights: the lean loop of
    ``sdft_cli.decode`` where it knows the architecture, else transformers ``generate``."""
    lean = decoder_for(model) if sampling.decoder == "auto" and not isinstance(model, Decoder) else model
    if isinstance(lean, Decoder):  # the lean loop (an owned, packed copy from ``rollout_copy``, or bound)
        with autocast(autocast_dtype, lean.device):
            return _generate_lean(lean, tokenizer, prompts, sampling, eos_ids, progress)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # buckets of similar length
    outs: dict[int, torch.Tensor] = {}
    lps: dict[int, torch.Tensor] = {}
    from transformers import GenerationConfig, LogitsProcessorList

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


def _generate_lean(
    dec: Decoder,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    eos_ids: list[int],
    progress: Callable[[int], None] | None = None,
) -> Rollouts:
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outs: list[torch.Tensor | None] = [None] * len(prompts)
    lps: list[torch.Tensor] = [torch.zeros(0)] * len(prompts)
    for start in range(0, len(order), sampling.batch_size):
        idx = order[start : start + sampling.batch_size]
        ids, mask = left_pad([prompts[i] for i in idx], pad_id)
        new, lp = dec.generate(
            ids.to(dec.device),
            mask.to(dec.device),
            sampling.max_new_tokens,
            eos_ids,
            pad_id,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_new_tokens=sampling.min_new_tokens,
            logprobs=sampling.logprobs,
        )
        new, lp = new.cpu(), (lp.cpu() if lp is not None else None)
        for row, i in enumerate(idx):
            outs[i] = new[row]
            if lp is not None:
                lps[i] = lp[row]
        if progress is not None:
            progress(len(idx))
    return assemble(prompts, outs, lps if sampling.logprobs else None, tokenizer, eos_ids)


def assemble(
    prompts: list[list[int]],
    seqs: list[torch.Tensor],
    logprobs: list[torch.Tensor] | None,
    tokenizer,
    eos_ids: list[int],
) -> Rollouts:
    """Rollouts from each prompt's generated ids (and their log-probs), whatever engine made them:
    right-padded, masked up to the first EOS, decoded."""
    pad_id = tokenizer.pad_token_id
    width = max(1, max(s.shape[0] for s in seqs))
    completions = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    lengths = torch.zeros(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):  # batches that all stopped early are narrower than `width`
        completions[i, : s.shape[0]] = s
        lengths[i] = s.shape[0]
    cmask, truncated = completion_mask(completions, eos_ids, lengths)
    completions = completions.masked_fill(cmask == 0, pad_id)
    texts = tokenizer.batch_decode(
        [c[: int(m.sum())] for c, m in zip(completions, cmask, strict=True)], skip_special_tokens=True
    )
    lp_out = None
    if logprobs is not None:
        lp_out = torch.zeros(completions.shape, dtype=torch.float32)
        for i, lp in enumerate(logprobs):
            lp_out[i, : lp.shape[0]] = lp
        lp_out = lp_out * cmask
    return Rollouts(prompts, completions, cmask, texts, truncated.tolist(), lp_out)


def inference_copy(model, dtype: torch.dtype | None, always: bool = False):
    """The model generation runs on: the model itself, or a frozen copy in ``dtype`` (``always``: a copy
    even in the model's dtype, as every rank of a distributed run needs whole weights to decode).

    Decoding on a CPU reads every weight once per token, so bf16 weights decode ~1.6x faster than fp32
    (2-core CPU, SmolLM2-135M, 8 x 48 tokens: 4.4-4.8 s vs 7.5 s). Like a vLLM engine, the copy's
    weights are synced from the student after every optimizer step (``sync_weights``).
    """
    if not always and (dtype is None or dtype == next(model.parameters()).dtype):
        return model
    copy_ = copy.deepcopy(model).to(dtype or next(model.parameters()).dtype)
    copy_.requires_grad_(False)
    copy_.eval()
    return copy_


def rollout_copy(model, dtype: torch.dtype | None, always: bool = False, decoder: str = "auto"):
    """The rollout engine of a training run: ``inference_copy``, or, for architectures ``sdft_cli.decode``
    knows, a ``Decoder`` holding its own fused (and, on CPUs, oneDNN-packed) copy of the weights."""
    own = dtype if dtype is not None else next(model.parameters()).dtype
    if decoder == "auto" and supported(model) and (always or own != next(model.parameters()).dtype):
        return Decoder.detached(model, own)
    return inference_copy(model, dtype, always=always)


@torch.no_grad()
def sync_weights(engine, student) -> None:
    """Copy the student's current weights into the inference copy (a no-op when they are the same model),
    or push them into a vLLM engine."""
    if engine is student:
        return
    if hasattr(engine, "push"):
        engine.push(student)
        return
    params = list(student.named_parameters())
    if any(hasattr(p, "full_tensor") for _, p in params):  # sharded: gather one tensor at a time
        for (name, e), (twin, p) in zip(engine.named_parameters(), params, strict=True):
            assert name == twin, f"inference copy and student differ: {name} vs {twin}"
            e.copy_(distributed.full(p.detach()))
        return
    torch._foreach_copy_(list(engine.parameters()), [p.detach() for _, p in params])


def _generate_vllm(*args, **kwargs) -> Rollouts:
    from sdft_cli.vllm_engine import generate_vllm

    return generate_vllm(*args, **kwargs)


ROLLOUT_BACKENDS = {"hf": generate_hf, "vllm": _generate_vllm}
