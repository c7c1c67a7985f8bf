"""What a training method receives, and the plumbing every method shares: resume, checkpoints, the
per-step log record.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sdft_cli import distributed, preempt, validation
from sdft_cli.artifacts import atomic_write_text
from sdft_cli.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    save_final,
)
from sdft_cli.config import MethodConfig, RolloutConfig
from sdft_cli.engines import Engines
from sdft_cli.logger import RunLogger, Timer, TokenMeans, append_jsonl, rewind_jsonl
from sdft_cli.rollout import Sampling
from sdft_cli.schedule import TrainState
from sdft_cli.tasks import Task
from sdft_cli.teacher import Teacher
from sdft_cli.validation import Periodic


@dataclass
class TrainContext:
    """Everything a method needs to train the student on one task (no Hydra objects past this point)."""

    model: torch.nn.Module
    tokenizer: object
    method: MethodConfig
    rollout: RolloutConfig
    autocast_dtype: torch.dtype | None
    eos_ids: list[int]
    seed: int
    stage: int
    train_dir: Path
    logger: RunLogger
    # The run's engine factory (rollouts; shares a colocated vLLM engine with evaluation).
    engines: Engines
    progress: bool = True
    # The model before the first task (row 0) and before this task: HF directories (or a hub id).
    base_dir: Path | str | None = None
    previous_dir: Path | str | None = None
    # Initialise a frozen or EMA teacher from these weights instead of the current student.
    teacher_init: Path | str | None = None
    # Added to the step of every logged record: a second training phase of the same stage logs after
    # the first (re-invocation after SFT).
    step_offset: int = 0
    # Where training runs (None = where the model is); a distributed run loads the model on the CPU and
    # sharding moves each rank's shard here.
    device: torch.device | None = None
    # model.trust_remote_code: also for reloading checkpoints and earlier results of a custom-code model
    trust_remote_code: bool = False
    # sft_reinvoke's general-purpose prompt set (loaded and checked with the run's inputs)
    prompts: Task | None = None
    # eval.every_steps: the task's periodic evaluations and the choice of its final weights (select)
    periodic: Periodic | None = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id  # type: ignore[attr-defined]

    @property
    def samples_log(self) -> Path:
        return self.train_dir / "samples.jsonl"


def sampling(ctx: TrainContext, task: Task, logprobs: bool = False) -> Sampling:
    """How training rollouts (and a task's fixed teacher set) are sampled: ``rollout.*``, the length
    cap falling back to the task's."""
    r = ctx.rollout
    return Sampling(
        max_new_tokens=r.max_new_tokens or task.cfg.max_new_tokens,
        temperature=r.temperature,
        top_p=r.top_p,
        top_k=r.top_k,
        batch_size=r.batch_size,
        logprobs=logprobs,
        min_new_tokens=r.min_new_tokens,
    )


def resume(ctx: TrainContext, teacher: Teacher, opt, sched, total: int) -> TrainState:
    """Restore the newest complete checkpoint of this task, or start at step 0.

    Logs written after that checkpoint are rewound, since those steps are about to run again.
    """
    ctx.train_dir.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(ctx.train_dir / "checkpoints")
    if ckpt is None:
        state = TrainState(step=0, total_steps=total)
    else:
        state = load_checkpoint(ckpt, ctx.model, teacher, opt, sched, ctx.trust_remote_code)
        print(f"[sdft] stage {ctx.stage}: resuming from {ckpt} (step {state.step}/{total})", flush=True)
    if distributed.current().main:
        ctx.logger.rewind(ctx.stage, ctx.step_offset + state.step)
        rewind_jsonl(ctx.samples_log, lambda r: r.get("step", 0) <= state.step)
        if state.step == 0 and ctx.samples_log.exists():
            atomic_write_text(ctx.samples_log, "")
        if ctx.periodic is not None:
            validation.rewind(ctx.train_dir, ctx.step_offset + state.step)
    state.total_steps = total
    p = ctx.periodic
    if p is not None and ckpt is not None and p.due(state.step, total):
        step = ctx.step_offset + state.step
        main = distributed.current().main
        recorded = main and any(r["step"] == step for r in validation.read_records(ctx.train_dir))
        if not distributed.from_main(recorded):  # stopped after this step's checkpoint, before its record
            record = p.evaluate(ctx.model, stage=ctx.stage, step=step)
            if record is not None:
                validation.commit(p, ctx.train_dir, record, ctx.model, checkpoint=ckpt, logger=ctx.logger)
            distributed.barrier()
    return state


def maybe_checkpoint(ctx: TrainContext, teacher: Teacher, opt, sched, state: TrainState) -> None:
    """Every ``save_every`` steps (not at the last one: the final model is saved by the stage), and
    whenever a preemption signal is held (then the signal is acted on: the job exits or requeues)."""
    every = ctx.method.save_every
    stop = distributed.any_rank(preempt.requested())  # a signal seen by one rank checkpoints them all
    p, last = ctx.periodic, state.step == state.total_steps
    record = None
    if p is not None and p.due(state.step, state.total_steps):  # scored before any checkpoint is written
        record = p.evaluate(ctx.model, stage=ctx.stage, step=ctx.step_offset + state.step)
    saved = None
    if stop or (every and not state.step % every and not last):
        path = ctx.train_dir / "checkpoints" / f"step_{state.step:06d}"
        saved = save_checkpoint(
            path, ctx.model, ctx.tokenizer, teacher=teacher, opt=opt, sched=sched, state=state
        )
        if distributed.current().main:
            prune_checkpoints(ctx.train_dir / "checkpoints", keep=path)
    if record is not None:  # rank 0
        validation.commit(p, ctx.train_dir, record, ctx.model, checkpoint=saved, last=last, logger=ctx.logger)
    if p is not None and p.due(state.step, state.total_steps):
        distributed.barrier()  # the other ranks wait for rank 0's evaluation
    if stop:
        held = preempt.requested()
        preempt.act()
        if distributed.current().enabled and not held:
            # another rank was signalled and leaves; this one has nobody to train with
            raise SystemExit(preempt.PEER_EXIT)


def finish(ctx: TrainContext, info: dict, teacher: Teacher | None = None) -> Path:
    """End the task: with periodic evaluations, the weights ``select`` chooses go into the student
    (recorded in ``selection.json`` and the manifest), then the final model and manifest are written."""
    if ctx.periodic is not None:
        last = ctx.step_offset + info["steps"]
        main = distributed.current().main
        chosen = distributed.gather(validation.select(ctx.periodic, ctx.train_dir, last) if main else None)[0]
        validation.load_selected(ctx.model, ctx.train_dir, chosen, ctx.trust_remote_code)
        info["selected"] = chosen
        if chosen["weights"] != "last" and main:
            print(
                f"[sdft] stage {ctx.stage} {info['task']}: select={chosen['rule']} ends the task with step "
                f"{chosen['step']} of {last}: {chosen['why']}",
                flush=True,
            )
    return save_final(ctx.train_dir, ctx.model, ctx.tokenizer, info, teacher)


def step_record(
    ctx: TrainContext,
    task: str,
    state: TrainState,
    *,
    loss: float,
    tokens: TokenMeans,
    grad_norm,
    lr: float,
    lengths: list[int],
    timer: Timer,
    started: float,
    device: torch.device,
    truncated: list[bool] | None = None,
    importance_weights: torch.Tensor | None = None,
) -> dict:
    """The step's log record, as every method writes it: totals and token means over all ranks (every
    rank must call this, in step), phase timers, the completions' lengths (the loss's sequences); for
    methods that sample them, their throughput, the share cut by the length cap and the importance
    weights; on CUDA the step's peak memory."""
    stats = tokens.means()
    (loss,) = distributed.sum_floats([loss])
    lengths = sum(distributed.gather(lengths), [])
    record = {
        "stage": ctx.stage,
        "task": task,
        "step": ctx.step_offset + state.step,
        "total_steps": state.total_steps,
        "train/loss": round(loss, 6),
        **{f"train/{k}": round(v, 6) for k, v in stats.items()},
        "train/grad_norm": round(distributed.scalar(grad_norm), 6),
        "train/skipped_steps": len(state.skipped),
        "train/lr": lr,
        "train/completion_len_mean": sum(lengths) / len(lengths),
        "train/completion_len_max": max(lengths),
        **timer.pop(),
        "time/step": round(time.perf_counter() - started, 4),
    }
    if "time/rollout" in record:  # generation throughput, every rank's completions
        record["train/tokens_per_s"] = round(sum(lengths) / max(record["time/rollout"], 1e-9), 2)
    if truncated is not None:
        truncated = sum(distributed.gather(truncated), [])
        record["train/truncated_frac"] = sum(truncated) / len(truncated)
    if importance_weights is not None:
        w = torch.cat(distributed.gather(importance_weights))
        record.update({"train/is_min": float(w.min()), "train/is_mean": float(w.mean())})
        record["train/is_max"] = float(w.max())
    if device.type == "cuda":  # the step's peak, then reset for the next
        record["mem/peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        torch.cuda.reset_peak_memory_stats(device)
    return record


def log_samples(ctx: TrainContext, step: int, rows: list[int], texts: list[str]) -> None:
    """The first ``method.log_samples`` completions of the step, for reading (rank 0 writes)."""
    if distributed.current().main:
        for row, text in list(zip(rows, texts, strict=True))[: ctx.method.log_samples]:
            append_jsonl(ctx.samples_log, {"step": step, "row": row, "completion": text})
