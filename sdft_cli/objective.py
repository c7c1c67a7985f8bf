"""The training objectives, as small pure functions over logits and masks.

SDFT (paper default, as used for its numbers): per-token forward KL(teacher || student) over the full
vocabulary on the student's own completion; the first ``skip`` completion tokens are masked; a token
mean per sequence, then a mean over sequences. SFT: next-token NLL on the demonstration, aggregated
the same way. Tensors are ``[batch, tokens, vocab]`` logits aligned with ``[batch, tokens]`` masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q), with 0 * log 0 = 0 (models that mask vocabulary rows with -inf logits)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_T || p_S) = sum_v p_T (log p_T - log p_S) per position; gradient flows to the student only."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1).detach()
    return _kl(log_t, log_s)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_S || p_T) = sum_v p_S (log p_S - log p_T) per position (the divergence in the paper's text)."""
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1).detach()
    return _kl(log_s, log_t)


DIVERGENCES = {"forward_kl": forward_kl, "reverse_kl": reverse_kl}


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position (the SFT loss)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def loss_mask(completion_mask: torch.Tensor, skip_first: int) -> torch.Tensor:
    """Completion tokens that carry loss: drop the first ``skip_first`` (they stay in the context)."""
    mask = completion_mask.clone().float()
    mask[:, :skip_first] = 0.0
    return mask


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float) -> torch.Tensor:
    """Reduce per-token losses of one micro-batch to its share of the step's loss.

    ``seq_mean``: sum over sequences of (masked token mean), divided by ``normalizer`` = sequences per
    optimizer step (so micro-batches add up to the paper's mean over sequences). ``token_mean``: sum of
    masked tokens divided by ``normalizer`` = loss tokens per optimizer step. Sequences with no loss
    tokens contribute zero but still count as sequences.
    """
    masked = per_token * mask
    if mode == "seq_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / normalizer
    if mode == "token_mean":
        return masked.sum() / max(normalizer, 1.0)
    raise ValueError(f"unknown aggregation {mode!r}")
