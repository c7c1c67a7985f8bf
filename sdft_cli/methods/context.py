"""What a training method receives, and the resume/checkpoint plumbing every method shares."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sdft_cli import distributed, preempt
from sdft_cli.artifacts import atomic_write_text
from sdft_cli.config import MethodConfig, RolloutConfig
from sdft_cli.logger import RunLogger, rewind_jsonl
from sdft_cli.update import (
    Teacher,
    TrainState,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)


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
    progress: bool = True
    # The model before the first task (row 0) and before this task, as HF directories.
    base_dir: Path | None = None
    previous_dir: Path | None = None
    # Initialise a frozen or EMA teacher from these weights instead of the current student.
    teacher_init: Path | None = None
    # Added to the step of every logged record: a second training phase of the same stage logs after
    # the first (re-invocation after SFT).
    step_offset: int = 0
    # Where training runs (None = where the model is); a distributed run loads the model on the CPU and
    # sharding moves each rank's shard here.
    device: torch.device | None = None
    # model.trust_remote_code: also for reloading checkpoints and earlier results of a custom-code model
    trust_remote_code: bool = False

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id  # type: ignore[attr-defined]

    @property
    def samples_log(self) -> Path:
        return self.train_dir / "samples.jsonl"


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
    state.total_steps = total
    return state


def maybe_checkpoint(ctx: TrainContext, teacher: Teacher, opt, sched, state: TrainState) -> None:
    """Every ``save_every`` steps (not at the last one: the final model is saved by the stage), and
    whenever a preemption signal is held (then the signal is acted on: the job exits or requeues)."""
    every = ctx.method.save_every
    stop = distributed.any_rank(preempt.requested())  # a signal seen by one rank checkpoints them all
    if stop or (every and not state.step % every and state.step < state.total_steps):
        path = ctx.train_dir / "checkpoints" / f"step_{state.step:06d}"
        save_checkpoint(path, ctx.model, ctx.tokenizer, teacher, opt, sched, state)
        if distributed.current().main:
            prune_checkpoints(ctx.train_dir / "checkpoints", keep=path)
    if stop:
        held = preempt.requested()
        preempt.act()
        if distributed.current().enabled and not held:
            # another rank was signalled and leaves; this one has nobody to train with
            raise SystemExit(preempt.PEER_EXIT)
