"""Evaluation: greedy decoding on held-out splits, scored by each task's scorer.

``evaluate_many`` decodes the prompts of several tasks in one batched, length-bucketed pass (each
capped at its task's ``max_new_tokens``); decoding on a CPU is bound by reading the weights, so larger
batches are nearly free. With ``teacher_template`` it scores the demonstration-conditioned teacher
context instead of the student's, which measures the paper's in-context precondition (Sec. 3.2): SDFT
can only teach what the teacher gets right and the student does not.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sdft_cli.rollout import Sampling, generate_hf
from sdft_cli.scorers import get_scorer
from sdft_cli.tasks import Task, encode_messages, student_messages, teacher_messages


@dataclass
class EvalResult:
    task: str
    metric: str
    value: float
    n: int
    stderr: float
    predictions: list[dict]


def _contexts(task: Task, tokenizer, teacher_template: str | None) -> list[list[int]]:
    system = task.cfg.system_prompt
    if teacher_template is None:
        msgs = [student_messages(ex.prompt, system) for ex in task.test]
    else:
        msgs = [
            teacher_messages(ex.prompt, ex.demonstration or "", teacher_template, system) for ex in task.test
        ]
    return [encode_messages(tokenizer, m) for m in msgs]


def evaluate_many(
    model,
    tokenizer,
    tasks: list[Task],
    eos_ids: list[int],
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
    teacher_template: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[EvalResult]:
    """Greedy-decode every test prompt of every task and score it; ``stderr`` is the binomial one."""
    scorers = [get_scorer(t.cfg.scorer, f"task.{t.name}.scorer") for t in tasks]
    prompts, limits, owner = [], [], []
    for k, task in enumerate(tasks):
        ctx = _contexts(task, tokenizer, teacher_template)
        prompts += ctx
        limits += [task.cfg.max_new_tokens] * len(ctx)
        owner += [k] * len(ctx)
    sampling = Sampling(max_new_tokens=max(limits), temperature=0.0, batch_size=batch_size)
    out = generate_hf(model, tokenizer, prompts, sampling, eos_ids, autocast_dtype, progress, limits=limits)
    results, start = [], 0
    for k, task in enumerate(tasks):
        preds = []
        for j, ex in enumerate(task.test):
            text, trunc = out.texts[start + j], out.truncated[start + j]
            preds.append(
                {
                    "index": ex.index,
                    "prompt": ex.prompt,
                    "answer": ex.answer,
                    "prediction": text,
                    "score": scorers[k](text, ex.answer or ""),
                    "truncated": trunc,
                }
            )
        start += len(task.test)
        n = len(preds)
        value = sum(p["score"] for p in preds) / n
        stderr = math.sqrt(max(value * (1 - value), 0.0) / n)
        results.append(EvalResult(task.name, task.cfg.scorer, value, n, stderr, preds))
    return results


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
