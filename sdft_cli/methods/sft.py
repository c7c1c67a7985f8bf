"""SFT on one task: next-token NLL on the expert demonstrations (off-policy), through the same loop,
batches, schedule, checkpoints and logs as `sdft.py`, of which this file is a copy-modify. With
``token_weighting=prob`` it is DFT (each token's NLL scaled by its detached probability); with
``targets=teacher`` the targets are a fixed set of the teacher's completions (``teacher_set.py``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft_cli import distributed, teacher_set
from sdft_cli.config import SFTConfig
from sdft_cli.divergence import nll
from sdft_cli.forward import completion_hidden, output_head
from sdft_cli.guard import check_step
from sdft_cli.logger import Timer, TokenMeans
from sdft_cli.loss import fused_loss, token_weights
from sdft_cli.methods.context import TrainContext, finish, maybe_checkpoint, resume, sampling, step_record
from sdft_cli.names import resolve_teacher_template
from sdft_cli.precision import autocast
from sdft_cli.prompts import encode_messages, encode_target, left_truncate
from sdft_cli.schedule import batch_indices, build_optimizer, steps_per_task
from sdft_cli.tasks import Task
from sdft_cli.teacher import Teacher


def train_task(ctx: TrainContext, task: Task) -> Path:
    cfg: SFTConfig = ctx.method  # type: ignore[assignment]
    student, tok = ctx.model, ctx.tokenizer
    timer = Timer()

    # ---------------------------------------------------------------- contexts, tokenised once
    cut = cfg.max_prompt_tokens  # the official code's left truncation, when set
    student_ctx = [left_truncate(encode_messages(tok, task.student(ex)), cut) for ex in task.train]
    device = ctx.device or next(student.parameters()).device
    if cfg.targets == "teacher":  # sampled once by the model the task starts from, given the demonstration
        template = resolve_teacher_template(cfg.teacher_template, task.cfg.teacher_template)
        teacher_ctx = [
            left_truncate(encode_messages(tok, task.teacher(ex, template)), cut) for ex in task.train
        ]
        fixed = teacher_set.build(
            ctx.train_dir,
            lambda: ctx.engines.for_training(  # built only when the set is not there yet
                student,
                device=device,
                work_dir=ctx.train_dir,
                source_dir=ctx.previous_dir or ctx.base_dir,
                whole_copy=distributed.current().enabled,
            ),
            student,
            teacher_ctx,
            sampling(ctx, task),
            per_prompt=1,
            seed=ctx.seed,
            stage=ctx.stage,
        )
        targets = fixed.completions
    else:
        targets = [
            encode_target(tok, task.student(ex), ex.demonstration or "", ctx.eos_ids) for ex in task.train
        ]

    # ---------------------------------------------------------------- optimizer, resume
    total = steps_per_task(cfg, len(task.train))
    student.train()
    if distributed.current().enabled:
        distributed.shard(student, device)
    opt, sched = build_optimizer(student, cfg.optim, total)
    no_teacher = Teacher("live", student, 1.0)  # SFT has no teacher; checkpoints hold none
    state = resume(ctx, no_teacher, opt, sched, total)
    objective = nll(cfg.token_weighting)

    bar = tqdm(
        total=total, initial=state.step, desc=f"{cfg.name} {task.name}", disable=not ctx.progress, leave=False
    )
    while state.step < total:
        t_step = time.perf_counter()
        batch = batch_indices(len(task.train), cfg.prompts_per_step, state.step, (ctx.seed, ctx.stage))
        idx = distributed.my_share(batch)  # the whole batch in one process

        # ------------------------------------------------------------ targets: the demonstrations
        width = max(len(targets[i]) for i in idx)
        comp = torch.full((len(idx), width), ctx.pad_id, dtype=torch.long)
        cmask_all = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            comp[row, : len(targets[i])] = torch.tensor(targets[i])
            cmask_all[row, : len(targets[i])] = 1
        # normalised over the whole batch (every rank's tokens): gradients are summed over ranks
        normalizer = (
            float(len(batch))
            if cfg.aggregation == "seq_mean"
            else distributed.sum_floats([float(cmask_all.sum())])[0]
        )

        # ------------------------------------------------------------ update, per micro-batch
        step_loss, tokens, bad_rows = 0.0, TokenMeans(), []
        for start in range(0, len(idx), cfg.micro_batch_size):
            mb = list(range(start, min(start + cfg.micro_batch_size, len(idx))))
            w = max(1, int(cmask_all[mb].sum(-1).max()))
            c, cmask = comp[mb, :w], cmask_all[mb, :w]
            sel = cmask.bool().to(device)
            with timer("update"):
                s_ctx = [student_ctx[idx[j]] for j in mb]
                h = completion_hidden(student, s_ctx, c, cmask, ctx.pad_id, ctx.autocast_dtype)[sel]
                head, head_params = output_head(student)  # after the forward: a sharded root is gathered
                weights = token_weights(cmask.float(), cfg.aggregation, normalizer).to(device)[sel]
                with autocast(ctx.autocast_dtype, device):
                    out = fused_loss(
                        h,
                        head,
                        params=head_params,
                        objective=objective,
                        targets=c.to(device)[sel],
                        weights=weights,
                        chunk_size=cfg.loss_chunk_size,
                    )
                out.loss.backward()
            with torch.no_grad():
                step_loss += float(out.loss)
                if not math.isfinite(step_loss) and not bad_rows:  # the first micro-batch that went bad
                    bad_rows = [idx[j] for j in mb]
                ones = torch.ones(int(sel.sum()))
                tokens.add("nll", out.stats["value"].cpu(), ones)
                tokens.add("entropy_student", out.stats["entropy_student"].cpu(), ones)
            del h, out

        # ------------------------------------------------------------ optimizer step
        with timer("optim"):
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm)
            lr = sched.get_last_lr()[0]
            where = {"stage": ctx.stage, "task": task.name, "step": ctx.step_offset + state.step + 1}
            if check_step(
                cfg.optim,
                state,
                loss=step_loss,
                grad_norm=grad_norm,
                where=where,
                rows=bad_rows or batch,
                logger=ctx.logger,
            ):
                opt.step()  # a skipped step leaves the weights and optimizer as they were
            sched.step()
            opt.zero_grad(set_to_none=True)
        state.step += 1

        # ------------------------------------------------------------ log, checkpoint
        record = step_record(
            ctx,
            task.name,
            state,
            loss=step_loss,
            tokens=tokens,
            grad_norm=grad_norm,
            lr=lr,
            lengths=cmask_all.sum(-1).tolist(),
            timer=timer,
            started=t_step,
            device=device,
        )
        ctx.logger.log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['train/loss']:.3f}")
        maybe_checkpoint(ctx, no_teacher, opt, sched, state)
    bar.close()
    info = {"method": cfg.name, "task": task.name, "steps": total, "skipped_steps": state.skipped}
    return finish(ctx, info)
