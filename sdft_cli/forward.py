"""Forward passes over ``context ; completion``: the teacher's and the student's view of the same tokens.

The input is ``[left-padded context ; right-padded completion]``. Training takes the final hidden
states at the positions that predict completion tokens (``completion_hidden``) and applies the output
head chunk by chunk inside the loss (``loss.fused_loss``), so no ``[tokens, vocab]`` logits are held
for a whole batch; ``completion_logits`` (logits at those positions only) serves evaluation and tests.
"""

from __future__ import annotations

import torch

from sdft_cli.distributed import unshard
from sdft_cli.loss import LinearHead
from sdft_cli.precision import autocast
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
    # positions count real tokens only, as in generate(); padding gets position 0 and is masked anyway
    ids, mask, positions = _inputs(contexts, completions, completion_mask, pad_id, device)
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


def _inputs(contexts, completions, completion_mask, pad_id, device):
    ctx_ids, ctx_mask = left_pad(contexts, pad_id)
    ids = torch.cat([ctx_ids, completions], dim=1).to(device)
    mask = torch.cat([ctx_mask, completion_mask.long()], dim=1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def completion_hidden(
    model,
    contexts: list[list[int]],
    completions: torch.Tensor,
    completion_mask: torch.Tensor,
    pad_id: int,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Final hidden states ``[B, T, H]`` whose row ``t`` predicts completion token ``t``.

    ``output_head(model)`` turns them into exactly the logits ``completion_logits`` returns.
    """
    device = next(model.parameters()).device
    ids, mask, positions = _inputs(contexts, completions, completion_mask, pad_id, device)
    width = completions.shape[1]
    # a sharded model (distributed.shard) runs its decoder through a method that gathers the root's weights
    decoder = getattr(model, "sdft_hidden", None) or model.get_decoder()
    with autocast(autocast_dtype, device):
        out = decoder(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
    return out.last_hidden_state[:, -(width + 1) : -1]


def output_head(model) -> tuple[LinearHead, list[torch.nn.Parameter]]:
    """The model's hidden-to-logits map (incl. logit scaling/soft-capping where a family has it) and its
    trainable tensors (the embedding matrix when it is tied). A sharded model's head is gathered first;
    take it anew after each forward, as sharding swaps the tensors."""
    unshard(model)
    lm_head = model.get_output_embeddings()
    cfg = getattr(model.config, "text_config", None) or model.config
    scale = getattr(cfg, "logit_scale", None)  # Cohere: multiplied
    divisor = getattr(cfg, "logits_scaling", None)  # Granite: divided
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    post = None
    if scale is not None or divisor is not None or cap is not None:

        def post(z: torch.Tensor) -> torch.Tensor:
            if scale is not None:
                z = z * scale
            if divisor is not None:
                z = z / divisor
            if cap is not None:
                z = torch.tanh(z / cap) * cap
            return z

    head = LinearHead(lm_head.weight, getattr(lm_head, "bias", None), post)
    return head, [p for p in lm_head.parameters() if p.requires_grad]
