"""Evaluation: greedy decoding on held-out splits, scored by each task's scorer.

With ``teacher_template`` it scores the demonstration-conditioned teacher context instead of the
student's, which measures the paper's in-context precondition (Sec. 3.2): SDFT can only teach what the
teacher gets right and the student does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sdft_cli.config import JudgeConfig, PassAtKConfig
from sdft_cli.divergence import kl
from sdft_cli.metrics import pass_at_k as pass_at_k_estimate
from sdft_cli.models import autocast
from sdft_cli.rollout import Rollouts, Sampling, generate_hf
from sdft_cli.score import completion_hidden, output_head
from sdft_cli.scorers import get_scorer
from sdft_cli.tasks import Example, Task, encode_messages


@dataclass
class EvalResult:
    task: str
    metric: str
    value: float
    n: int
    stderr: float
    predictions: list[dict]
    # what was decoded, kept for diagnostics on the same tokens (not written to results.json)
    contexts: list[list[int]] = field(default_factory=list, repr=False)
    completions: torch.Tensor | None = field(default=None, repr=False)
    completion_mask: torch.Tensor | None = field(default=None, repr=False)
    # judged tasks: the other mappings of the same verdicts (knowledge: strict and lenient), name -> mean
    extra: dict[str, float] = field(default_factory=dict)


def _contexts(task: Task, tokenizer, teacher_template: str | None) -> list[list[int]]:
    if teacher_template is None:
        msgs = [task.student(ex) for ex in task.test]
    else:
        msgs = [task.teacher(ex, teacher_template) for ex in task.test]
    return [encode_messages(tokenizer, m) for m in msgs]


def task_scorer(task: Task, judge: JudgeConfig | None = None) -> Callable[[Example, str], float]:
    """``score(example, prediction)`` for the task's scorer; a judge also reads the example's prompt."""
    from sdft_cli.judge import JUDGE_SCORERS, for_scorer

    if task.cfg.scorer in JUDGE_SCORERS:
        j = for_scorer(task.cfg.scorer, judge or JudgeConfig())
        return lambda ex, text: j.score(ex.prompt, ex.answer or "", text)
    scorer = get_scorer(task.cfg.scorer, f"task.{task.name}.scorer")
    return lambda ex, text: scorer(text, ex.answer or "")


def evaluate_many(
    model,
    tokenizer,
    tasks: list[Task],
    eos_ids: list[int],
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
    teacher_template: str | None = None,
    progress: Callable[[int], None] | None = None,
    judge: JudgeConfig | None = None,
    generate: Callable[..., Rollouts] = generate_hf,
) -> list[EvalResult]:
    """Greedy-decode every test prompt of every task and score it; ``stderr`` is the binomial one.

    One task at a time: pooling tasks into larger batches was no faster on a 2-core CPU (decoding at
    batch 32+ is compute-bound) and would make the longest task's cap every task's.
    """
    results = []
    for task in tasks:
        sampling = Sampling(max_new_tokens=task.cfg.max_new_tokens, temperature=0.0, batch_size=batch_size)
        prompts = _contexts(task, tokenizer, teacher_template)
        out = generate(model, tokenizer, prompts, sampling, eos_ids, autocast_dtype, progress)
        preds = [
            {
                "index": ex.index,
                "prompt": ex.prompt,
                "answer": ex.answer,
                "prediction": text,
                "truncated": trunc,
            }
            for ex, text, trunc in zip(task.test, out.texts, out.truncated, strict=True)
        ]
        extra = score_predictions(task, preds, judge)
        n = len(preds)
        value = sum(p["score"] for p in preds) / n
        stderr = math.sqrt(value * (1 - value) / n)
        results.append(
            EvalResult(
                task.name,
                task.cfg.scorer,
                value,
                n,
                stderr,
                preds,
                prompts,
                out.completion_ids,
                out.completion_mask,
                extra=extra,
            )
        )
    return results


def score_predictions(task: Task, preds: list[dict], judge: JudgeConfig | None) -> dict[str, float]:
    """Set each prediction's ``score`` (and a judge's ``verdict``). For a judged task, also return the
    mean credit of the same verdicts under the other scorers of its prompt (strict and lenient)."""
    from sdft_cli.judge import CREDIT, JUDGE_SCORERS, for_scorer

    if task.cfg.scorer not in JUDGE_SCORERS:
        score = task_scorer(task, judge)
        for p, ex in zip(preds, task.test, strict=True):
            p["score"] = score(ex, p["prediction"])
        return {}
    j = for_scorer(task.cfg.scorer, judge or JudgeConfig())
    for p, ex in zip(preds, task.test, strict=True):
        p["verdict"] = j.verdict(ex.prompt, ex.answer or "", p["prediction"])
        p["score"] = CREDIT[j.mapping].get(p["verdict"], 0.0)
    return {
        name: sum(CREDIT[mapping].get(p["verdict"], 0.0) for p in preds) / len(preds)
        for name, (prompt, mapping) in JUDGE_SCORERS.items()
        if prompt == j.prompt and name != task.cfg.scorer
    }


@torch.no_grad()
def kl_to_base(
    base,
    model,
    result: EvalResult,
    pad_id: int,
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
    chunk_tokens: int = 256,
    base_contexts: list[list[int]] | None = None,
) -> dict:
    """RL's Razor's forgetting predictor: forward KL(pi_0 || pi) from the base model, per token over the
    full vocabulary, on the evaluated model's own greedy completions of the task's test prompts.

    ``base_contexts`` (default: the evaluated contexts) are what the base model reads before the same
    completions: the student prompts when the evaluated "model" is the teacher context (paper Sec. 3.2).

    Both models stop at their final hidden states; vocabulary-sized logits exist for ``chunk_tokens``
    tokens at a time. Returns the mean per completion token and the mean per sequence of its summed KL
    (nats), and the reverse direction KL(pi || pi_0) per token (``kl_model_base_token``), the one the
    SDFT paper's Sec. 3.2 reports, which on the model's own samples estimates the sequence-level KL.
    """
    assert result.completions is not None and result.completion_mask is not None
    comps, masks = result.completions.clone(), result.completion_mask.clone()  # out of inference mode
    head_b, _ = output_head(base)
    head_m, _ = output_head(model)
    device = next(model.parameters()).device
    base_contexts = result.contexts if base_contexts is None else base_contexts
    seq_sums: list[float] = []
    reverse = 0.0
    for s in range(0, len(result.contexts), batch_size):
        ctx = result.contexts[s : s + batch_size]
        width = max(1, int(masks[s : s + batch_size].sum(-1).max()))
        c, m = comps[s : s + batch_size, :width], masks[s : s + batch_size, :width]
        sel = m.bool().to(device)
        hb = completion_hidden(base, base_contexts[s : s + batch_size], c, m, pad_id, autocast_dtype)[sel]
        hm = completion_hidden(model, ctx, c, m, pad_id, autocast_dtype)[sel]
        per = torch.empty(hb.shape[0], dtype=torch.float32)
        with autocast(autocast_dtype, device):
            for t in range(0, hb.shape[0], chunk_tokens):
                lb = torch.log_softmax(head_b(hb[t : t + chunk_tokens]).float(), -1)
                lm = torch.log_softmax(head_m(hm[t : t + chunk_tokens]).float(), -1)
                per[t : t + chunk_tokens] = kl(lb, lm).cpu()
                reverse += float(kl(lm, lb).sum())
        rows = torch.zeros(m.shape, dtype=torch.float32).masked_scatter(m.bool(), per)
        seq_sums += rows.sum(-1).tolist()
    tokens = float(masks.sum())
    return {
        "kl_to_base_token": sum(seq_sums) / max(tokens, 1.0),
        "kl_to_base_seq": sum(seq_sums) / max(len(seq_sums), 1),
        "kl_model_base_token": reverse / max(tokens, 1.0),
        "n": len(seq_sums),
    }


def pass_at_k(
    model,
    tokenizer,
    task: Task,
    eos_ids: list[int],
    cfg: PassAtKConfig,
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
    judge: JudgeConfig | None = None,
    generate: Callable[..., Rollouts] = generate_hf,
) -> dict:
    """Sample ``cfg.n`` completions per test prompt and return the unbiased pass@k for each k, with
    the per-prompt correct counts (a sample is correct when the task's scorer gives it 1)."""
    score = task_scorer(task, judge)
    prompts = _contexts(task, tokenizer, None)
    sampling = Sampling(
        max_new_tokens=task.cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        batch_size=batch_size,
    )
    torch.manual_seed(cfg.seed)
    out = generate(
        model, tokenizer, [p for p in prompts for _ in range(cfg.n)], sampling, eos_ids, autocast_dtype
    )
    correct = [
        sum(score(ex, text) >= 1.0 for text in out.texts[i * cfg.n : (i + 1) * cfg.n])
        for i, ex in enumerate(task.test)
    ]
    return {
        "task": task.name,
        "n": cfg.n,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "pass_at_k": {
            str(k): sum(pass_at_k_estimate(cfg.n, c, k) for c in correct) / len(correct) for k in cfg.k
        },
        "correct": correct,
    }


def evaluate(
    model,
    tokenizer,
    task: Task,
    eos_ids: list[int],
    batch_size: int = 32,
    autocast_dtype=None,
    teacher_template: str | None = None,
    progress=None,
) -> EvalResult:
    """One task (see ``evaluate_many``)."""
    return evaluate_many(
        model, tokenizer, [task], eos_ids, batch_size, autocast_dtype, teacher_template, progress
    )[0]
