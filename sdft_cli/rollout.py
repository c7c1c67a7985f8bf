"""Rollouts: what an engine returns for a list of prompts, and the settings it samples with.

The data types every engine (``sdft_cli.engines``) shares sit here, below them: ``Sampling`` in,
``Rollouts`` out, and ``assemble``, which turns any engine's generated ids into ``Rollouts``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
