"""SDFT on one task: every optimizer step samples fresh rollouts from the current student (on-policy),
``rollouts_per_prompt`` per prompt, scores them with the demonstration-conditioned teacher, and distils
the teacher's per-token distributions into the student. With ``generate_from=teacher`` the same loop is
offline distillation, on the teacher's fresh samples or on a fixed set of them (``teacher_set.py``).
Reads top to bottom; `sft.py` is a copy-modify of this file.

One step, in the files it touches: the engine samples (``engines/``), both models run their forward
pass over the same completion tokens (``forward.py``), the fused loss forms logits chunk by chunk and
applies the per-token divergence (``loss.py``, ``divergence.py``), then AdamW steps and the EMA
teacher follows (``teacher.py``).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft_cli import distributed, teacher_set
from sdft_cli.config import SDFTConfig
from sdft_cli.divergence import distillation, k3
from sdft_cli.forward import completion_hidden, output_head
from sdft_cli.guard import check_step
from sdft_cli.logger import Timer, TokenMeans
from sdft_cli.loss import fused_loss, importance_weights, loss_mask, sampled_logprobs, token_weights
from sdft_cli.methods.context import (
    TrainContext,
    finish,
    log_samples,
    maybe_checkpoint,
    resume,
    sampling,
    step_record,
)
from sdft_cli.names import resolve_teacher_template
from sdft_cli.precision import autocast, autocast_dtype
from sdft_cli.prompts import encode_messages, left_truncate
from sdft_cli.schedule import batch_indices, build_optimizer, step_seed, steps_per_task
from sdft_cli.tasks import Task
from sdft_cli.teacher import make_teacher


def use_importance_sampling(cfg: SDFTConfig, backend: str, temperature: float) -> bool:
    """TIS is on when asked, or (auto) when another engine than the trainer samples the student's
    rollouts (and they are sampled at all: greedy rollouts have no sampler probabilities to correct).
    Never when the teacher samples (offline distillation): its completions are not the student's policy
    drifted by an engine, and the official code turns TIS off there too."""
    if cfg.generate_from == "teacher":
        return False
    if cfg.importance_sampling == "on":
        return True
    return cfg.importance_sampling == "auto" and backend != "hf" and temperature > 0


def train_task(ctx: TrainContext, task: Task) -> Path:
    cfg: SDFTConfig = ctx.method  # type: ignore[assignment]
    student, tok = ctx.model, ctx.tokenizer
    timer = Timer()

    # ---------------------------------------------------------------- contexts, tokenised once
    template = resolve_teacher_template(cfg.teacher_template, task.cfg.teacher_template)
    cut = cfg.max_prompt_tokens  # the official code's left truncation, when set
    student_ctx = [left_truncate(encode_messages(tok, task.student(ex)), cut) for ex in task.train]
    teacher_ctx = [left_truncate(encode_messages(tok, task.teacher(ex, template)), cut) for ex in task.train]
    tis = use_importance_sampling(cfg, ctx.rollout.backend, ctx.rollout.temperature)
    sample = sampling(ctx, task, logprobs=tis)
    on_policy = cfg.generate_from == "student"
    sample_ctx = student_ctx if on_policy else teacher_ctx
    n = cfg.rollouts_per_prompt

    # ---------------------------------------------------------------- teacher, engine, optimizer, resume
    dist = distributed.current()
    total = steps_per_task(cfg, len(task.train))
    student.train()
    # The teacher starts from the current student (the previous task's result), not the hub base.
    teacher = make_teacher(cfg.teacher, student, cfg.ema_alpha, cfg.teacher_storage)
    # a teacher from other weights: re-invocation's, or the run's base model (method.teacher_init=base)
    init = ctx.teacher_init or (ctx.base_dir if cfg.teacher_init == "base" and ctx.stage > 1 else None)
    if init is not None:
        teacher.load_weights(init, ctx.trust_remote_code)
    sampler = student if on_policy else teacher.model
    device = ctx.device or next(student.parameters()).device

    def make_engine():  # before sharding: each rank decodes with whole weights
        return ctx.engines.for_training(
            sampler,
            device=device,
            work_dir=ctx.train_dir,
            source_dir=ctx.previous_dir or ctx.base_dir,
            whole_copy=dist.enabled,
        )

    fixed = engine = None
    if cfg.generate_from == "teacher" and cfg.teacher_samples == "fixed":
        # offline distillation on a fixed set: the task's starting teacher samples it once (or a
        # resumed task reads it); no engine is kept for the steps
        fixed = teacher_set.build(
            ctx.train_dir,
            make_engine,
            sampler,
            teacher_ctx,
            sample,
            per_prompt=n,
            seed=ctx.seed,
            stage=ctx.stage,
        )
    else:
        engine = make_engine()
    if dist.enabled:
        distributed.shard(student, device)
        teacher.shard(device)
    opt, sched = build_optimizer(student, cfg.optim, total, per_tensor=cfg.teacher_storage == "offset")
    teacher.follow(opt)  # an offset teacher moves inside the optimizer step
    state = resume(ctx, teacher, opt, sched, total)
    objective = distillation(cfg.spec())
    auto = cfg.teacher_precision == "auto"
    score_amp = ctx.autocast_dtype if auto else autocast_dtype(cfg.teacher_precision, device)

    bar = tqdm(
        total=total, initial=state.step, desc=f"{cfg.name} {task.name}", disable=not ctx.progress, leave=False
    )
    while state.step < total:
        t_step = time.perf_counter()
        batch = batch_indices(len(task.train), cfg.prompts_per_step, state.step, (ctx.seed, ctx.stage))
        idx = distributed.my_share(batch)  # the whole batch in one process
        rows = [i for i in idx for _ in range(n)]  # each prompt's rollouts side by side

        # ------------------------------------------------------------ rollout: the student samples
        torch.manual_seed(step_seed(ctx.seed, ctx.stage, state.step, dist.rank))
        with timer("rollout"):
            if fixed is not None:
                ro = fixed.rollouts(rows, [k for _ in idx for k in range(n)], ctx.pad_id)
            else:
                assert engine is not None
                with nullcontext() if on_policy else teacher.scoring():  # a LoRA teacher's adapter
                    engine.push(sampler)
                    ro = engine.generate([sample_ctx[i] for i in rows], sample)
                engine.release()  # the engine's memory goes back to the trainer until the next push
        lmask = loss_mask(ro.completion_mask, cfg.skip_first_tokens)
        # normalised over the whole batch (every rank's tokens): gradients are summed over ranks
        normalizer = (
            float(len(batch) * n)
            if cfg.aggregation == "seq_mean"
            else distributed.sum_floats([float(lmask.sum())])[0]
        )

        # ------------------------------------------------------------ score + update, per micro-batch
        step_loss, tokens, is_w, bad_rows = 0.0, TokenMeans(), [], []
        for start in range(0, len(rows), cfg.micro_batch_size):
            mb = list(range(start, min(start + cfg.micro_batch_size, len(rows))))
            width = max(1, int(ro.completion_mask[mb].sum(-1).max()))  # trim shared right padding
            comp, cmask, lm = ro.completion_ids[mb, :width], ro.completion_mask[mb, :width], lmask[mb, :width]
            # completion tokens (up to EOS), flattened row by row: the loss sees only these
            sel = cmask.bool().to(device)
            targets = comp.to(device)[sel]
            seq_ids = torch.arange(len(mb), device=device).unsqueeze(-1).expand(sel.shape)[sel]
            # the teacher reads the demonstration-conditioned context; its logits are formed in the loss
            with timer("score"), torch.no_grad(), teacher.scoring():
                t_ctx = [teacher_ctx[rows[j]] for j in mb]
                h_t = completion_hidden(teacher.model, t_ctx, comp, cmask, ctx.pad_id, score_amp)[sel]
                head_t = teacher.head()  # after the forward: a sharded root is gathered
                if ctx.autocast_dtype is None:  # scored in bf16, read by the fp32 loss
                    h_t = h_t.to(head_t.weight.dtype)
            # the student reads the prompt alone
            with timer("update"):
                s_ctx = [student_ctx[rows[j]] for j in mb]
                h_s = completion_hidden(student, s_ctx, comp, cmask, ctx.pad_id, ctx.autocast_dtype)[sel]
                head_s, head_params = output_head(student)
                weights = token_weights(lm, cfg.aggregation, normalizer).to(device)
                if tis:  # one truncated importance weight per sequence, from the sampler's log-probs
                    with autocast(ctx.autocast_dtype, device):
                        lp = sampled_logprobs(
                            h_s.detach(), head_s, targets, sample.temperature, cfg.loss_chunk_size
                        )
                    lp_train = torch.zeros(sel.shape, device=device).masked_scatter(sel, lp)
                    lp_sampler = ro.logprobs[mb, :width].to(device)
                    w_seq = importance_weights(lp_train, lp_sampler, lm.to(device), cfg.is_cap)
                    weights = weights * w_seq.unsqueeze(-1)
                    is_w.append(w_seq.cpu())
                with autocast(ctx.autocast_dtype, device):
                    out = fused_loss(
                        h_s,
                        head_s,
                        params=head_params,
                        objective=objective,
                        targets=targets,
                        weights=weights[sel],
                        teacher=h_t,
                        teacher_head=head_t,
                        seq_ids=seq_ids,
                        chunk_size=cfg.loss_chunk_size,
                    )
                out.loss.backward()
            timer.move(out.teacher_seconds, "update", "score")  # the teacher's logits are teacher work
            if teacher.model is not student:
                distributed.reshard(teacher.model)
            with torch.no_grad():
                step_loss += float(out.loss)
                if not math.isfinite(step_loss) and not bad_rows:  # the first micro-batch that went bad
                    bad_rows = sorted({rows[j] for j in mb})
                st = {k: v.cpu() for k, v in out.stats.items()}
                on_loss = lm[sel.cpu()]
                on_comp = torch.ones_like(on_loss)
                tokens.add("divergence", st["value"], on_loss)  # the per-token divergence, token mean
                tokens.add("k3", k3(st["logp_student"], st["logp_teacher"]), on_loss)
                tokens.add("entropy_student", st["entropy_student"], on_comp)
                tokens.add("entropy_teacher", st["entropy_teacher"], on_comp)
                tokens.add("masked_frac", 1.0 - on_loss, on_comp)
            del h_t, h_s, out

        # ------------------------------------------------------------ optimizer step, then the EMA teacher
        with timer("optim"):
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm)
            lr = sched.get_last_lr()[0]
            where = {"stage": ctx.stage, "task": task.name, "step": ctx.step_offset + state.step + 1}
            apply = check_step(
                cfg.optim,
                state,
                loss=step_loss,
                grad_norm=grad_norm,
                where=where,
                rows=bad_rows or batch,
                logger=ctx.logger,
            )
            if apply:  # a skipped step leaves the weights, optimizer and teacher as they were
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if apply:
                teacher.update(student)
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
            lengths=ro.lengths,
            timer=timer,
            started=t_step,
            truncated=ro.truncated,
            importance_weights=torch.cat(is_w) if is_w else None,
            device=device,
        )
        ctx.logger.log(record)
        log_samples(ctx, state.step, rows, ro.texts)
        bar.update(1)
        bar.set_postfix(
            loss=f"{record['train/loss']:.3f}",
            div=f"{record['train/divergence']:.3f}",
            len=f"{record['train/completion_len_mean']:.0f}",
        )
        maybe_checkpoint(ctx, teacher, opt, sched, state)
    bar.close()
    info = {"method": cfg.name, "task": task.name, "steps": total, "skipped_steps": state.skipped}
    return finish(ctx, info, teacher if cfg.save_teacher else None)
