"""Which completion tokens carry loss, and with what weight.

The per-token terms live in ``divergence.py`` and the chunked reduction in ``chunked.py``; this module
turns masks, the aggregation mode and (off-policy) importance weights into one weight per token, so the
step's loss is ``sum_n w_n * loss_n`` whatever the options.
"""

from __future__ import annotations

import torch


def loss_mask(completion_mask: torch.Tensor, skip_first: int) -> torch.Tensor:
    """Completion tokens that carry loss: drop the first ``skip_first`` (they stay in the context).

    ``completion_mask`` already ends at the first EOS and excludes padding.
    """
    mask = completion_mask.clone().float()
    mask[:, :skip_first] = 0.0
    return mask


def token_weights(mask: torch.Tensor, mode: str, normalizer: float) -> torch.Tensor:
    """Per-token weights of one micro-batch, so that micro-batches add up to the step's loss.

    ``seq_mean``: each sequence's masked token mean, summed, divided by ``normalizer`` = sequences per
    optimizer step (the paper's mean over sequences). ``token_mean``: masked tokens divided by
    ``normalizer`` = loss tokens per optimizer step. A sequence with no loss tokens gets zero weight but
    still counts as a sequence.
    """
    if mode == "seq_mean":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1.0) / normalizer
    if mode == "token_mean":
        return mask / max(normalizer, 1.0)
    raise ValueError(f"unknown aggregation {mode!r}")


def importance_weights(
    logp_train: torch.Tensor, logp_sampler: torch.Tensor, mask: torch.Tensor, cap: float
) -> torch.Tensor:
    """Truncated importance weight per sequence (official SDFT code): the mean over its loss tokens of
    ``min(exp(logp_train - logp_sampler), cap)``; 1 for a sequence without loss tokens."""
    ratio = torch.exp(logp_train - logp_sampler).clamp(max=cap) * mask
    count = mask.sum(-1)
    return torch.where(count > 0, ratio.sum(-1) / count.clamp(min=1.0), torch.ones_like(count))
