"""Evaluation: greedy decoding on held-out splits, scored by each task's scorer, and the evaluation
stage that fills one row of the forgetting matrix (``evaluate_stage``).

With ``teacher_template`` it scores the demonstration-conditioned teacher context instead of the
student's, which measures the paper's in-context precondition (Sec. 3.2): SDFT can only teach what the
teacher gets right and the student does not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft_cli import prior
from sdft_cli.artifacts import atomic_write_json, write_jsonl, write_manifest
from sdft_cli.config import EvalConfig, JudgeConfig, PassAtKConfig
from sdft_cli.divergence import kl
from sdft_cli.drift import completion_stats, weight_distance
from sdft_cli.engines import Engine, Engines
from sdft_cli.engines.hf import inference_copy
from sdft_cli.forward import completion_hidden, output_head
from sdft_cli.judge import CREDIT, for_scorer
from sdft_cli.logger import NullLogger, RunLogger
from sdft_cli.metrics import pass_at_k as pass_at_k_estimate
from sdft_cli.models import load_model
from sdft_cli.names import JUDGE_SCORERS
from sdft_cli.precision import autocast, inference_dtype
from sdft_cli.prompts import encode_messages
from sdft_cli.rollout import Sampling
from sdft_cli.scorers import get_scorer
from sdft_cli.tasks import Example, Task


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
    if task.cfg.scorer in JUDGE_SCORERS:
        j = for_scorer(task.cfg.scorer, judge or JudgeConfig())
        return lambda ex, text: j.score(ex.prompt, ex.answer or "", text)
    scorer = get_scorer(task.cfg.scorer, f"task.{task.name}.scorer")
    return lambda ex, text: scorer(text, ex.answer or "")


def evaluate_many(
    engine: Engine,
    tokenizer,
    tasks: list[Task],
    *,
    batch_size: int = 32,
    teacher_template: str | None = None,
    progress: Callable[[int], None] | None = None,
    judge: JudgeConfig | None = None,
) -> list[EvalResult]:
    """Greedy-decode every test prompt of every task on ``engine`` and score it; ``stderr`` is the
    binomial one.

    One task at a time: pooling tasks into larger batches was no faster on a 2-core CPU (decoding at
    batch 32+ is compute-bound) and would make the longest task's cap every task's.
    """
    results = []
    for task in tasks:
        sampling = Sampling(max_new_tokens=task.cfg.max_new_tokens, temperature=0.0, batch_size=batch_size)
        prompts = _contexts(task, tokenizer, teacher_template)
        out = engine.generate(prompts, sampling, progress)
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
    *,
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
    engine: Engine,
    tokenizer,
    task: Task,
    cfg: PassAtKConfig,
    *,
    batch_size: int = 32,
    judge: JudgeConfig | None = None,
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
    out = engine.generate([p for p in prompts for _ in range(cfg.n)], sampling)
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


def evaluate(engine: Engine, tokenizer, task: Task, **kwargs) -> EvalResult:
    """One task (see ``evaluate_many``)."""
    return evaluate_many(engine, tokenizer, [task], **kwargs)[0]


# ----------------------------------------------------------------------------- the evaluation stage


class BaseModel:
    """The base model in the evaluation dtype, loaded on the CPU when first needed (the KL-to-base
    diagnostic; it visits the accelerator only while that runs)."""

    def __init__(self, path: Path | str, dtype: str, eval_dtype: torch.dtype | None, trust: bool = False):
        self.path, self.dtype, self.eval_dtype, self.trust = path, dtype, eval_dtype, trust
        self._model: torch.nn.Module | None = None

    def get(self) -> torch.nn.Module:
        if self._model is None:
            base = load_model(self.path, self.dtype, torch.device("cpu"), self.trust)
            self._model = inference_copy(base, self.eval_dtype)
            self._model.requires_grad_(False)
        return self._model


@dataclass
class EvalContext:
    """What every evaluation stage of a run shares (built once, after the inputs are checked)."""

    cfg: EvalConfig
    tokenizer: object
    tasks: dict[str, Task]
    probes: dict[str, Task]
    engines: Engines
    logger: RunLogger | NullLogger
    autocast_dtype: torch.dtype | None
    # model.dtype: the weights' dtype, which evaluation keeps unless eval.dtype casts them
    model_dtype: str
    base: BaseModel
    # lm-eval's task index when eval.prior has benchmarks (built by the input checks)
    lm_eval_tasks: object = None
    progress: bool = True
    trust_remote_code: bool = False

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype the evaluated model is cast to (None: its own)."""
        return inference_dtype(self.cfg.dtype, self.autocast_dtype)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype or self.model_dtype).removeprefix("torch.")


def _cells(results: list[EvalResult], stage: int, stage_task: str, kinds: dict[str, str]) -> list[dict]:
    """``results.json``'s cells: one per task and probe, plus a judged task's other verdict mappings
    (in results.json and matrix.csv, not the matrix)."""
    cells = []
    for res in results:
        cells.append(
            {
                "stage": stage,
                "stage_task": stage_task,
                "eval_task": res.task,
                "kind": kinds[res.task],
                "metric": res.metric,
                "value": res.value,
                "n": res.n,
                "stderr": res.stderr,
            }
        )
        for metric, value in res.extra.items():
            stderr = math.sqrt(value * (1 - value) / res.n)
            cells.append({**cells[-1], "metric": metric, "value": value, "stderr": stderr})
    return cells


def evaluate_stage(
    ctx: EvalContext, out_dir: Path, stage: int, stage_task: str, model, path: Path, previous=None
) -> None:
    """Evaluate every task and probe after ``stage`` (0: the base model), and the lm-eval suite; write
    predictions, ``results.json``, the diagnostics and the manifest (last). ``path`` is the checkpoint
    ``model`` was loaded from, ``previous`` the one the stage started from (``drift.json``)."""
    ctx.logger.rewind_eval(stage)
    every = [*ctx.tasks.values(), *ctx.probes.values()]
    kinds = {**{n: "trained" for n in ctx.tasks}, **{n: "prior" for n in ctx.probes}}
    total = sum(len(t.test) for t in every)
    bar = tqdm(total=total, desc=f"eval stage {stage}", leave=False, disable=not ctx.progress)
    t0 = time.perf_counter()
    copy = inference_copy(model, ctx.dtype)
    engine = ctx.engines.for_eval(copy, backend=ctx.cfg.backend, path=path)
    judge, batch = ctx.cfg.judge, ctx.cfg.batch_size
    results = evaluate_many(engine, ctx.tokenizer, every, batch_size=batch, progress=bar.update, judge=judge)
    engine.release()
    bar.close()
    for res in results:
        write_jsonl(out_dir / "predictions" / f"{res.task}.jsonl", res.predictions)
    cells = _cells(results, stage, stage_task, kinds)
    if prior.runs_at(ctx.cfg.prior, stage, len(ctx.tasks)):
        cells += prior.evaluate(
            ctx.cfg.prior,
            ctx.lm_eval_tasks,
            copy,
            ctx.tokenizer,
            path=path,
            dtype=ctx.dtype_name,
            out_dir=out_dir,
            stage=stage,
            stage_task=stage_task,
            trust_remote_code=ctx.trust_remote_code,
        )
    atomic_write_json(out_dir / "results.json", cells)
    diag = {}
    if stage > 0 and ctx.cfg.kl_to_base and stage_task in ctx.tasks:
        new = next(r for r in results if r.task == stage_task)
        base = ctx.base.get().to(next(model.parameters()).device)
        pad = ctx.tokenizer.pad_token_id  # type: ignore[attr-defined]
        diag = kl_to_base(base, copy, new, pad_id=pad, batch_size=batch, autocast_dtype=ctx.autocast_dtype)
        base.to("cpu")
        atomic_write_json(out_dir / "diagnostics.json", {"task": stage_task, **diag})
    if ctx.cfg.drift:
        pad = ctx.tokenizer.pad_token_id  # type: ignore[attr-defined]
        stats = completion_stats(
            copy, results, pad_id=pad, batch_size=batch, autocast_dtype=ctx.autocast_dtype
        )
        moved: dict = {"stage": stage, "columns": stats}
        if stage > 0 and previous is not None:
            moved["weights"] = {"to_base": weight_distance(path, ctx.base.path)}
            moved["weights"]["to_previous"] = weight_distance(path, previous)
        atomic_write_json(out_dir / "drift.json", moved)
    passk = []
    if ctx.cfg.pass_at_k.k:
        for task in ctx.tasks.values():
            passk.append(
                pass_at_k(engine, ctx.tokenizer, task, ctx.cfg.pass_at_k, batch_size=batch, judge=judge)
            )
        engine.release()
        atomic_write_json(out_dir / "pass_at_k.json", passk)
    ctx.logger.log(
        {
            "stage": stage,
            "event": "eval",
            "time/eval": round(time.perf_counter() - t0, 3),
            **{f"eval/{c['eval_task']}/{c['metric']}": c["value"] for c in cells},
            **({"eval/kl_to_base": diag["kl_to_base_token"]} if diag else {}),
            **{f"eval/{p['task']}/pass@{k}": v for p in passk for k, v in p["pass_at_k"].items()},
        }
    )
    info = {"stage": stage, "stage_task": stage_task}
    excluded = {n: t.excluded for n, t in ctx.tasks.items() if t.excluded}
    if excluded:  # exclude_train_overlap: test-pool questions left out as training questions
        info["test_excluded"] = excluded
    write_manifest(out_dir, info)
