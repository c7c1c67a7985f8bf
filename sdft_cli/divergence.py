"""Per-token loss terms on logits: the distillation divergence x support x estimator, and SFT's NLL.

``distillation(spec)`` and ``nll(weighting)`` return the ``TokenLoss`` the fused loss (``loss.py``)
reduces over a batch's tokens; the paper's objective also carries its closed-form logit gradient.

Conventions (``docs/objective.md`` has the derivations):

- ``forward``: KL(p_T || p_S) = sum_v p_T (log p_T - log p_S), the paper's numbers.
- ``reverse``: KL(p_S || p_T), the paper's text.
- ``jsd``: generalized JSD with mixture M = beta p_T + (1 - beta) p_S,
  JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M) (GKD, TRL). beta = 0 is *defined* as forward
  KL and beta = 1 as reverse KL; these are the limits of JSD_beta / beta and JSD_beta / (1 - beta).
- Support ``full``: the whole vocabulary. ``topk``: the k ids of the student's or teacher's largest
  logits; both distributions are either renormalised over them (``topk_tail=renorm``) or get a (k+1)-th
  bucket holding the remaining mass (``topk_tail=bucket``).
- Estimator ``analytic``: the divergence itself (its gradient is exact per token). ``sampled``: the
  score-function estimator of reverse KL on the sampled token y, surrogate sg(l_S - l_T) * l_S with
  l = log p(y); its value is reported as the k1 estimate l_S - l_T. ``rb``: analytic reverse KL plus
  the Rao-Blackwellised score term (see ``chunked.rb_coefficients``).
- Both models' logits are divided by the same ``temperature`` before the softmax.

The teacher side is always constant (no gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdft_cli.config.method import DivergenceSpec


def kl(log_p: torch.Tensor, log_q: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """sum_v p (log p - log q) over the last dim, with 0 * log 0 = 0 (-inf logits are allowed).

    The mask is applied to the log-ratio before the product, so masked entries get zero gradient
    rather than 0 * inf = NaN. ``p`` is ``log_p.exp()`` when the caller already has it.
    """
    p = log_p.exp() if p is None else p
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return (p * diff).sum(-1)


def entropy_from_logp(log_p: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    p = log_p.exp() if p is None else p
    return -(p * torch.where(p > 0, log_p, torch.zeros_like(p))).sum(-1)


def _divergence(log_s: torch.Tensor, log_t: torch.Tensor, name: str, beta: float) -> torch.Tensor:
    if name == "forward":
        return kl(log_t, log_s)
    if name == "reverse":
        return kl(log_s, log_t)
    # mixture in log space: log(beta p_T + (1 - beta) p_S)
    # (-inf rows of both models are floored so that logsumexp's gradient stays finite there)
    parts = torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)])
    log_m = torch.logsumexp(parts.clamp(min=torch.finfo(parts.dtype).min), dim=0)
    return beta * kl(log_t, log_m) + (1.0 - beta) * kl(log_s, log_m)


def restrict(log_p: torch.Tensor, idx: torch.Tensor, tail: str) -> torch.Tensor:
    """A full log-distribution restricted to ids ``idx``: renormalised, or with a tail bucket appended.

    The bucket's log-mass is a log-sum-exp over the other ids (exact even when it is tiny, unlike
    log(1 - top mass)); with k >= V it is empty and holds probability 0.
    """
    top = log_p.gather(-1, idx)
    if tail == "renorm":
        return top - torch.logsumexp(top, dim=-1, keepdim=True)
    floor = torch.finfo(log_p.dtype).min  # finite stand-in for -inf: keeps gradients of empty tails at 0
    rest = log_p.scatter(-1, idx, float("-inf")).clamp(min=floor)
    bucket = torch.logsumexp(rest, dim=-1, keepdim=True)
    bucket = torch.where(bucket < floor / 2, torch.full_like(bucket, float("-inf")), bucket)
    return torch.cat([top, bucket], dim=-1)


@dataclass
class TokenTerms:
    """Per-token outputs: ``loss`` carries the gradient; the rest are constants for logging."""

    loss: torch.Tensor  # the surrogate whose gradient is the estimator
    value: torch.Tensor  # the divergence (or its sampled estimate) per token
    logp_student: torch.Tensor  # log p_S(y) of the sampled token (temperature applied; differentiable)
    logp_teacher: torch.Tensor  # log p_T(y)
    entropy_student: torch.Tensor
    entropy_teacher: torch.Tensor


def token_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    spec: DivergenceSpec,
) -> TokenTerms:
    """Distillation terms for ``[..., V]`` logits and ``[...]`` sampled tokens.

    Computed in float32 (or float64 if given float64). The ``rb`` score term couples tokens of a
    sequence and is added by the caller (it needs ``value`` of later tokens).
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_s = F.log_softmax(student_logits.to(dtype) / spec.temperature, dim=-1)
    with torch.no_grad():
        log_t = F.log_softmax(teacher_logits.to(dtype) / spec.temperature, dim=-1)
        ent_t = entropy_from_logp(log_t)
        ent_s = entropy_from_logp(log_s.detach())
    lp_s = log_s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lp_t = log_t.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    if spec.estimator == "sampled":
        delta = (lp_s - lp_t).detach()
        loss = delta * lp_s
        value = delta
    else:
        a, b = log_s, log_t
        if spec.support == "topk":
            with torch.no_grad():
                source = log_s if spec.topk_source == "student" else log_t
                idx = source.topk(min(spec.topk, source.shape[-1]), dim=-1).indices
            a, b = restrict(log_s, idx, spec.topk_tail), restrict(log_t, idx, spec.topk_tail)
        loss = _divergence(a, b, spec.effective_divergence, spec.jsd_beta)
        value = loss.detach()
    # log p_S(y) keeps its gradient: the rb estimator's score term is built on it
    return TokenTerms(loss, value, lp_s, lp_t, ent_s, ent_t)


@torch.no_grad()
def forward_kl_terms_and_grad(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    temperature: float,
) -> tuple[TokenTerms, torch.Tensor]:
    """Full-vocabulary forward KL(p_T || p_S) per token and the gradient of ``sum_n w_n KL_n`` with
    respect to the student's logits, ``w_n (p_S - p_T) / temperature``, in closed form.

    Equal to ``token_terms`` followed by autograd (the chunked loss's fast path for the paper's
    objective), without building the graph of the softmaxes: fewer vocabulary-sized passes.
    """
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    z_s, z_t = student_logits.to(dtype), teacher_logits.to(dtype)
    if temperature != 1.0:
        z_s, z_t = z_s / temperature, z_t / temperature
    # With finite logits everything follows from the log-normalisers and three dot products over the
    # vocabulary (log p = z - lse): KL = <p_T, z_T - z_S> - (lse_T - lse_S), H = lse - <p, z>. That is
    # about a third of the vocabulary-sized passes of the masked form below. The KL takes the dot with
    # the logit difference, not the difference of two dots, which would cancel to ~1e-5 in fp32.
    lse_s, lse_t = torch.logsumexp(z_s, dim=-1), torch.logsumexp(z_t, dim=-1)
    p_s, p_t = torch.softmax(z_s, dim=-1), torch.softmax(z_t, dim=-1)
    value = _dot(p_t, z_t - z_s) - (lse_t - lse_s)
    ent_s, ent_t = lse_s - _dot(p_s, z_s), lse_t - _dot(p_t, z_t)
    if bool(torch.isfinite(torch.stack([value, ent_s, ent_t])).all()):
        lp_s = z_s.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse_s
        lp_t = z_t.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse_t
        grad = p_s.sub_(p_t).mul_((weights / temperature).unsqueeze(-1))
        return TokenTerms(value, value, lp_s, lp_t, ent_s, ent_t), grad
    # -inf logits (masked vocabulary): 0 * log 0 = 0 needs the explicit masks
    log_s = F.log_softmax(z_s, dim=-1)
    log_t = F.log_softmax(z_t, dim=-1)
    p_s, p_t = log_s.exp(), log_t.exp()
    value = kl(log_t, log_s, p_t)
    ent_s, ent_t = entropy_from_logp(log_s, p_s), entropy_from_logp(log_t, p_t)
    lp_s = log_s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lp_t = log_t.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    grad = p_s.sub_(p_t).mul_((weights / temperature).unsqueeze(-1))
    return TokenTerms(value, value, lp_s, lp_t, ent_s, ent_t), grad


def _dot(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum_v p * z over the last dim as a batched matrix product (no vocabulary-sized temporary)."""
    return torch.matmul(p.unsqueeze(-2), z.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def k3(logp_student: torch.Tensor, logp_teacher: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(p_S || p_T) on tokens sampled from p_S: r - 1 - log r, r = p_T / p_S."""
    log_r = logp_teacher - logp_student
    return torch.expm1(log_r) - log_r


# ----------------------------------------------------------------------------- token losses

TermFn = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], TokenTerms]
ClosedForm = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[TokenTerms, torch.Tensor]
]


@dataclass(frozen=True)
class TokenLoss:
    """A per-token loss, as ``loss.fused_loss`` takes it.

    ``terms(student_logits, teacher_logits, targets)`` gives every token's ``TokenTerms`` (the teacher's
    logits are None for SFT). ``closed_form(z_s, z_t, y, w)``, where the objective has one, gives the same
    terms and the gradient of ``sum_n w_n loss_n`` w.r.t. the student's logits without autograd.
    ``rb`` adds the Rao-Blackwellised score term, which couples a sequence's tokens (``loss.py``).
    """

    terms: TermFn
    closed_form: ClosedForm | None = None
    rb: bool = False


def distillation(spec: DivergenceSpec) -> TokenLoss:
    """The distillation objective of ``spec`` (every divergence, support and estimator)."""

    def terms(s: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor) -> TokenTerms:
        if t is None:
            raise ValueError("distillation needs the teacher's logits")
        return token_terms(s, t, y, spec)

    closed_form = None
    if spec.support == "full" and spec.estimator == "analytic" and spec.effective_divergence == "forward":
        # the paper's objective: its logit gradient is w (p_S - p_T) / temperature
        def closed_form(s, t, y, w):
            return forward_kl_terms_and_grad(s, t, y, w, spec.temperature)

    return TokenLoss(terms, closed_form, rb=spec.estimator == "rb")


def nll(weighting: str = "none") -> TokenLoss:
    """SFT: -log p(y); ``weighting=prob`` multiplies by the detached p(y) (DFT)."""

    def terms(s: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor) -> TokenTerms:
        log_s = torch.log_softmax(s.float() if s.dtype != torch.float64 else s, dim=-1)
        lp = log_s.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        loss = -lp * lp.detach().exp() if weighting == "prob" else -lp
        with torch.no_grad():
            p = log_s.exp()
            ent = -torch.where(p > 0, p * log_s, torch.zeros_like(p)).sum(-1)
        zero = torch.zeros_like(lp).detach()
        return TokenTerms(loss, (-lp).detach(), lp, zero, ent, zero)

    return TokenLoss(terms)
