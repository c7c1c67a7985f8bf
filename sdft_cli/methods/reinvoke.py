"""SFT + re-invocation (the paper's Table 5 baseline, after Lu & Thinking Machines Lab 2025).

Two phases per task, each resumable on its own: SFT on the task's demonstrations (``train/sft/``, a
complete stage of its own), then on-policy distillation on general-purpose prompts with the base model
as a frozen teacher that reads the same prompt (``train/``): the student samples, the base scores,
the student minimises the per-token divergence to it. This is the SDFT loop with another teacher and
other prompts, so it shares its loss, batching, checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from sdft_cli import distributed
from sdft_cli.artifacts import verified
from sdft_cli.checkpoint import latest_checkpoint
from sdft_cli.config import SDFTConfig, SFTConfig, SFTReinvokeConfig
from sdft_cli.methods import sdft, sft
from sdft_cli.methods.context import TrainContext
from sdft_cli.models import load_model
from sdft_cli.schedule import steps_per_task
from sdft_cli.tasks import Task


def phase_configs(cfg: SFTReinvokeConfig, n_prompts: int) -> tuple[SFTConfig, SDFTConfig]:
    """The SFT phase's config and the re-invocation phase's (exactly ``reinvoke.steps`` steps)."""
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SFTConfig) if f.name != "name"}
    sft_cfg = SFTConfig(**{**shared, "name": "sft"})
    r = cfg.reinvoke
    distill = {k: v for k, v in shared.items() if k in {f.name for f in dataclasses.fields(SDFTConfig)}}
    distill.update(
        name="reinvoke",
        epochs=r.steps * cfg.prompts_per_step / n_prompts,
        max_steps=r.steps,
        optim=dataclasses.replace(cfg.optim, lr=r.lr),
        divergence=r.divergence,
        teacher="frozen",
        skip_first_tokens=0,
        teacher_template="prompt_only",
    )
    distill.pop("token_weighting", None)
    return sft_cfg, SDFTConfig(**distill)


def train_task(ctx: TrainContext, task: Task) -> Path:
    cfg: SFTReinvokeConfig = ctx.method  # type: ignore[assignment]
    prompts = ctx.prompts  # method.reinvoke.prompts, loaded and checked with the run's inputs
    if prompts is None:
        raise ValueError("sft_reinvoke trains with the context's prompt set (tasks.load_inputs)")
    sft_cfg, distill_cfg = phase_configs(cfg, len(prompts.train))

    # ---------------------------------------------------------------- phase 1: SFT on the task
    sft_dir = ctx.train_dir / "sft"
    model = ctx.model
    # verified on rank 0 only (a corrupt one is reported and redone), the decision shared
    if not distributed.from_main(distributed.current().main and verified(sft_dir)):
        sft.train_task(dataclasses.replace(ctx, method=sft_cfg, train_dir=sft_dir), task)
        if distributed.current().main:
            shutil.rmtree(sft_dir / "checkpoints", ignore_errors=True)
        distributed.barrier()
        if distributed.current().enabled:  # the student is sharded now; phase 2 shards a fresh copy
            model = _reload(ctx, sft_dir / "model")
    elif latest_checkpoint(ctx.train_dir / "checkpoints") is None:
        # resumed between the phases: the in-memory student is the previous task's, load the SFT result
        ctx.model.load_state_dict(
            load_model(sft_dir / "model", trust_remote_code=ctx.trust_remote_code).state_dict()
        )

    # ---------------------------------------------------------------- phase 2: re-invocation
    teacher = ctx.base_dir if cfg.reinvoke.teacher == "base" else ctx.previous_dir
    rollout = dataclasses.replace(ctx.rollout, max_new_tokens=cfg.reinvoke.prompts.max_new_tokens)
    phase = dataclasses.replace(
        ctx,
        model=model,
        method=distill_cfg,
        rollout=rollout,
        teacher_init=teacher,
        step_offset=steps_per_task(sft_cfg, len(task.train)),
        periodic=None,  # the SFT phase's periodic evaluations chose its weights; re-invocation keeps them
    )
    return sdft.train_task(phase, prompts)


def _reload(ctx: TrainContext, path: Path):
    """The student as saved at ``path``, on the CPU, ready to be sharded again."""
    dtype = str(next(ctx.model.parameters()).dtype).removeprefix("torch.")
    model = load_model(path, dtype, trust_remote_code=ctx.trust_remote_code)
    if ctx.method.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
