"""The token loss: which completion tokens carry it and with what weight, and the loss itself, fused with
the output projection and computed in chunks of tokens.

Weights (``loss_mask``, ``token_weights``, ``importance_weights``) turn masks, the aggregation mode and
(off-policy) importance weights into one weight per token, so a step's loss is ``sum_n w_n * loss_n``
whatever the options; the per-token terms are ``divergence.py``'s.

A full-vocabulary loss written naively holds ``[tokens, vocab]`` logits for both models, their
log-softmaxes and their gradients at once (the usual out-of-memory in distillation trainers). Here the
student's final hidden states ``[N, H]`` go in, and for each chunk of tokens the logits are formed,
the per-token terms computed, and the gradient with respect to the chunk's hidden states and the
output head taken right away (``torch.autograd.grad`` on the chunk); only those gradients are kept.
The backward pass then scales them by the incoming gradient. Values and gradients are those of the
naive computation (``naive_loss``), peak memory grows with ``chunk_size``, and no logits are computed
twice.

The loss is ``sum_n w_n * loss_n`` (the weights fold in masks, aggregation and importance weights).
For the Rao-Blackwellised estimator, add ``sum_n c_n * log p_S(y_n)`` with
``c_n = sum_{t > n, same sequence} w_t * value_t``; chunks run from the last token backwards so that
every ``c_n`` is known when its chunk is processed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdft_cli.divergence import TokenLoss, TokenTerms

# ----------------------------------------------------------------------------- which tokens, what weight


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


# ----------------------------------------------------------------------------- the fused loss

Head = Callable[[torch.Tensor], torch.Tensor]

STAT_FIELDS = ("value", "logp_student", "logp_teacher", "entropy_student", "entropy_teacher")


@dataclass
class LossOutput:
    loss: torch.Tensor
    stats: dict[str, torch.Tensor]  # per token, constants
    # wall time spent forming the teacher's logits inside the loss (teacher work, reported as scoring)
    teacher_seconds: float = 0.0


def rb_coefficients(
    values: torch.Tensor, weights: torch.Tensor, seq_ids: torch.Tensor, carry: torch.Tensor
) -> torch.Tensor:
    """c_n = carry[seq_n] + sum of w_t * value_t over later tokens of the same sequence in this chunk.

    ``seq_ids`` is non-decreasing (tokens flattened row by row); ``carry`` holds, per sequence, the sum
    over tokens in later chunks and is updated in place.
    """
    v = weights * values
    carry_v = carry[seq_ids].to(v.dtype)
    suffix = v.flip(0).cumsum(0).flip(0)  # inclusive suffix sums over the chunk
    ext = torch.cat([suffix, suffix.new_zeros(1)])
    last = torch.searchsorted(seq_ids, seq_ids, right=True) - 1  # last chunk index of each token's sequence
    c = suffix - v - ext[last + 1] + carry_v
    carry.index_add_(0, seq_ids, v.to(carry.dtype))
    return c


def _chunk_loss(terms: TokenTerms, weights, seq_ids, carry, rb: bool) -> torch.Tensor:
    loss = (weights * terms.loss).sum()
    if rb:
        c = rb_coefficients(terms.value, weights, seq_ids, carry)
        loss = loss + (c * terms.logp_student).sum()
    return loss


@dataclass
class LinearHead:
    """``post(h @ weight.T + bias)``: an output projection, optionally followed by an elementwise map
    (logit scaling, soft-capping). Its linear part lets the chunked loss form the weight gradient with
    one in-place ``addmm`` per chunk instead of a weight-sized temporary."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    post: Callable[[torch.Tensor], torch.Tensor] | None = None

    def linear(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h, self.weight, self.bias)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        z = self.linear(h)
        return self.post(z) if self.post is not None else z


def _teacher_logits(teacher, teacher_head, sl):
    if teacher is None:
        return None
    return teacher[sl] if teacher_head is None else teacher_head(teacher[sl])


@dataclass
class _Setup:
    """What the fused loss's forward needs besides its tensors (autograd.Function takes positionals)."""

    head: Head
    teacher_head: Head | None
    objective: TokenLoss
    chunk: int
    n_seqs: int
    teacher_seconds: float = 0.0  # written by the forward


class _FusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, teacher, targets, weights, seq_ids, setup: _Setup, *params):  # noqa: D102
        head, teacher_head, chunk, n_seqs = setup.head, setup.teacher_head, setup.chunk, setup.n_seqs
        term_fn, rb = setup.objective.terms, setup.objective.rb
        n = h.shape[0]
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        linear = isinstance(head, LinearHead)
        closed_form = setup.objective.closed_form if linear and not rb and head.post is None else None
        grad_h = torch.empty_like(h, dtype=acc)
        grad_p: list[torch.Tensor | None] = [None] * len(params)  # the first chunk writes, later ones add
        stats = {k: torch.zeros(n, dtype=acc, device=h.device) for k in STAT_FIELDS}
        total = torch.zeros((), dtype=acc, device=h.device)
        carry = torch.zeros(n_seqs, dtype=torch.float64, device=h.device)
        amp = torch.is_autocast_enabled(h.device.type)
        for s in reversed(range(0, n, chunk)):  # backwards: the rb coefficients need later tokens first
            sl = slice(s, min(s + chunk, n))
            t0 = time.perf_counter()
            with torch.no_grad():
                t_logits = _teacher_logits(teacher, teacher_head, sl)
            setup.teacher_seconds += time.perf_counter() - t0
            if linear:
                # gradient w.r.t. the pre-activation logits z only; h and the weight get it by matmuls
                hc = h[sl].detach()
                with torch.no_grad():
                    z = head.linear(hc)
                if closed_form is not None:
                    terms, gz = closed_form(z, t_logits, targets[sl], weights[sl])
                    loss = (weights[sl] * terms.loss).sum()
                else:
                    z.requires_grad_(True)
                    with torch.enable_grad():
                        logits = head.post(z) if head.post is not None else z
                        terms = term_fn(logits, t_logits, targets[sl])
                        loss = _chunk_loss(terms, weights[sl], seq_ids[sl], carry, rb)
                        (gz,) = torch.autograd.grad(loss, [z])
                with torch.no_grad():
                    w = head.weight
                    gz_ = gz.to(w.dtype) if not amp else gz
                    grad_h[sl] = (gz_ @ w).to(acc)
                    for i, p in enumerate(params):
                        if p is head.weight:  # accumulated in place, in the accumulator's precision
                            g = gz.T.to(acc)
                            if grad_p[i] is None:
                                grad_p[i] = (g @ hc.to(acc)).to(acc)
                            elif amp:  # the chunk's product in bf16, as autocast forms weight gradients
                                grad_p[i].add_(g @ hc.to(acc))
                            else:
                                grad_p[i].addmm_(g, hc.to(acc))
                        elif p is head.bias:
                            g = gz.to(acc).sum(0)
                            grad_p[i] = g if grad_p[i] is None else grad_p[i] + g
                del z, gz
            else:
                hc = h[sl].detach().requires_grad_(True)
                with torch.enable_grad():
                    terms = term_fn(head(hc), t_logits, targets[sl])
                    loss = _chunk_loss(terms, weights[sl], seq_ids[sl], carry, rb)
                    grads = torch.autograd.grad(loss, [hc, *params], allow_unused=True)
                grad_h[sl] = grads[0]
                for i, g in enumerate(grads[1:]):
                    if g is not None:
                        if grad_p[i] is None:
                            grad_p[i] = g.to(acc)
                        else:
                            grad_p[i].add_(g)
                del grads
            total += loss.detach().to(acc)
            for k in STAT_FIELDS:
                stats[k][sl] = getattr(terms, k).detach().to(acc)
            del terms, loss, t_logits
        grad_p = [
            torch.zeros_like(p) if g is None else g.to(p.dtype) for g, p in zip(grad_p, params, strict=True)
        ]
        ctx.save_for_backward(grad_h.to(h.dtype), *grad_p)
        out = [stats[k] for k in STAT_FIELDS]
        ctx.mark_non_differentiable(*out)
        return (total, *out)

    @staticmethod
    def backward(ctx, grad_total, *_):  # noqa: D102
        # in place: the saved gradients are used once, and a weight-sized copy is what chunking avoids
        if getattr(ctx, "used", False):
            raise RuntimeError("the fused loss supports one backward pass (no retain_graph)")
        ctx.used = True
        grads = [g.mul_(grad_total.to(g.dtype)) for g in ctx.saved_tensors]
        return (grads[0], None, None, None, None, None, *grads[1:])


def fused_loss(
    h: torch.Tensor,
    head: Head,
    *,
    params: list[torch.Tensor],
    objective: TokenLoss,
    targets: torch.Tensor,
    weights: torch.Tensor,
    teacher: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    seq_ids: torch.Tensor | None = None,
    chunk_size: int = 256,
) -> LossOutput:
    """``sum_n w_n loss_n`` (+ the rb term) over ``N`` tokens without holding ``[N, V]`` logits.

    ``h``: the student's final hidden states ``[N, H]``; ``head(h)`` gives logits; ``params``: the head's
    trainable tensors, which receive gradients. ``objective``: the per-token loss (``divergence.py``).
    ``teacher``: the teacher's hidden states (with ``teacher_head``) or its logits ``[N, V]``
    (``teacher_head=None``), or None for SFT-style terms. ``seq_ids``: each token's sequence (rows
    flattened in order), for the rb term. ``chunk_size <= 0`` computes everything at once through plain
    autograd (``naive_loss``). With a ``LinearHead`` the weight gradient is accumulated in place chunk
    by chunk; any other callable works through ``torch.autograd.grad`` on each chunk (a weight-sized
    temporary per chunk).
    """
    if seq_ids is None:
        seq_ids = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    if chunk_size <= 0:
        return naive_loss(
            h,
            head,
            objective=objective,
            targets=targets,
            weights=weights,
            teacher=teacher,
            teacher_head=teacher_head,
            seq_ids=seq_ids,
        )
    n_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 1
    setup = _Setup(head, teacher_head, objective, chunk_size, n_seqs)
    trainable = [p for p in params if p.requires_grad]
    total, *stats = _FusedLoss.apply(h, teacher, targets, weights, seq_ids, setup, *trainable)
    return LossOutput(total, dict(zip(STAT_FIELDS, stats, strict=True)), setup.teacher_seconds)


def naive_loss(
    h: torch.Tensor,
    head: Head,
    *,
    objective: TokenLoss,
    targets: torch.Tensor,
    weights: torch.Tensor,
    teacher: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    seq_ids: torch.Tensor | None = None,
) -> LossOutput:
    """The same loss with full ``[N, V]`` logits held through autograd (reference and benchmark)."""
    if seq_ids is None:
        seq_ids = torch.zeros(h.shape[0], dtype=torch.long, device=h.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        t_logits = _teacher_logits(teacher, teacher_head, slice(None))
    seconds = time.perf_counter() - t0
    terms = objective.terms(head(h), t_logits, targets)
    n_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 1
    carry = torch.zeros(n_seqs, dtype=torch.float64, device=h.device)
    loss = _chunk_loss(terms, weights, seq_ids, carry, objective.rb)
    return LossOutput(loss, {k: getattr(terms, k).detach() for k in STAT_FIELDS}, seconds)


@torch.no_grad()
def sampled_logprobs(
    h: torch.Tensor, head: Head, targets: torch.Tensor, temperature: float, chunk_size: int
) -> torch.Tensor:
    """log softmax(head(h) / temperature)[target] per token, chunk by chunk (no gradient)."""
    out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
    step = chunk_size if chunk_size > 0 else max(h.shape[0], 1)
    for s in range(0, h.shape[0], step):
        logits = head(h[s : s + step]).float() / temperature
        lp = torch.log_softmax(logits, dim=-1)
        out[s : s + step] = lp.gather(-1, targets[s : s + step].unsqueeze(-1)).squeeze(-1)
    return out
