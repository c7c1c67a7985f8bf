"""Scoring completions under a context: the teacher's (and the student's) logits on the student's tokens.

The input is ``[left-padded context ; right-padded completion]``; only the positions that predict
completion tokens go through the output projection (``logits_to_keep``), so long prompts and
demonstrations cost no vocabulary-sized logits.
"""

from __future__ import annotations

import torch

from sdft_cli.models import autocast
from sdft_cli.rollout import left_pad


def completion_logits(
    model,
    contexts: list[list[int]],
    completions: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_id: int,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits ``[B, T, V]`` where row ``t`` is the model's prediction of completion token ``t``.

    Runs under whatever grad mode the caller chose: ``no_grad`` for the teacher, grad for the student.
    """
    device = next(model.parameters()).device
    ctx_ids, ctx_mask = left_pad(contexts, pad_id)
    ids = torch.cat([ctx_ids, completions], dim=1).to(device)
    mask = torch.cat([ctx_mask, completion_mask.long()], dim=1).to(device)
    # positions count real tokens only, as in generate(); padding gets position 0 and is masked anyway
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    width = completions.shape[1]
    with autocast(autocast_dtype, device):
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=width + 1,
            use_cache=False,
        )
    return out.logits[:, :-1]


@torch.no_grad()
def teacher_score(
    teacher,
    contexts: list[list[int]],
    completions: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_id: int,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The teacher's next-token logits on the student's completion, given the teacher context.

    ``no_grad`` rather than ``inference_mode``: the result enters the student's loss as a constant.
    """
    return completion_logits(teacher, contexts, completions, completion_mask, pad_id, autocast_dtype)
