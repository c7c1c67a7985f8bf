"""SDFT on one task: every optimizer step samples fresh rollouts from the current student (on-policy),
scores them with the demonstration-conditioned teacher, and distils the teacher's per-token
distributions into the student. Reads top to bottom; `sft.py` is a copy-modify of this file.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft_cli.config import SDFTConfig
from sdft_cli.logger import Timer, TokenMeans, append_jsonl
from sdft_cli.methods.context import TrainContext, maybe_checkpoint, resume
from sdft_cli.models import inference_dtype
from sdft_cli.objective import DIVERGENCES, aggregate, entropy, loss_mask
from sdft_cli.rollout import ROLLOUT_BACKENDS, Sampling, inference_copy, sync_weights
from sdft_cli.score import completion_logits, teacher_score
from sdft_cli.tasks import Task, encode_messages, resolve_teacher_template, student_messages, teacher_messages
from sdft_cli.update import Teacher, batch_indices, build_optimizer, save_final, step_seed, steps_per_task


def train_task(ctx: TrainContext, task: Task) -> Path:
    cfg: SDFTConfig = ctx.method  # type: ignore[assignment]
    student, tok = ctx.model, ctx.tokenizer
    timer = Timer()

    # ---------------------------------------------------------------- contexts, tokenised once
    template = resolve_teacher_template(cfg.teacher_template, task.cfg.teacher_template)
    system = task.cfg.system_prompt
    student_ctx = [encode_messages(tok, student_messages(ex.prompt, system)) for ex in task.train]
    teacher_ctx = [
        encode_messages(tok, teacher_messages(ex.prompt, ex.demonstration or "", template, system))
        for ex in task.train
    ]
    sampling = Sampling(
        max_new_tokens=ctx.rollout.max_new_tokens or task.cfg.max_new_tokens,
        temperature=ctx.rollout.temperature,
        top_p=ctx.rollout.top_p,
        top_k=ctx.rollout.top_k,
        batch_size=ctx.rollout.batch_size,
    )
    generate = ROLLOUT_BACKENDS[ctx.rollout.backend]

    # ---------------------------------------------------------------- optimizer, teacher, resume
    total = steps_per_task(cfg, len(task.train))
    student.train()
    opt, sched = build_optimizer(student, cfg.optim, total)
    # The teacher starts from the current student (the previous task's result), not the hub base.
    teacher = Teacher(cfg.teacher, student, cfg.ema_alpha)
    state = resume(ctx, teacher, opt, sched, total)
    engine = inference_copy(student, inference_dtype(ctx.rollout.dtype, ctx.autocast_dtype))

    bar = tqdm(
        total=total, initial=state.step, desc=f"sdft {task.name}", disable=not ctx.progress, leave=False
    )
    while state.step < total:
        t_step = time.perf_counter()
        idx = batch_indices(len(task.train), cfg.prompts_per_step, state.step, (ctx.seed, ctx.stage))

        # ------------------------------------------------------------ rollout: the student samples
        torch.manual_seed(step_seed(ctx.seed, ctx.stage, state.step))
        with timer("rollout"):
            sync_weights(engine, student)
            ro = generate(
                engine, tok, [student_ctx[i] for i in idx], sampling, ctx.eos_ids, ctx.autocast_dtype
            )
        lmask = loss_mask(ro.completion_mask, cfg.skip_first_tokens)
        normalizer = float(len(idx)) if cfg.aggregation == "seq_mean" else float(lmask.sum())

        # ------------------------------------------------------------ score + update, per micro-batch
        step_loss, tokens = 0.0, TokenMeans()
        for start in range(0, len(idx), cfg.micro_batch_size):
            mb = list(range(start, min(start + cfg.micro_batch_size, len(idx))))
            width = max(1, int(ro.completion_mask[mb].sum(-1).max()))  # trim shared right padding
            comp, cmask, lm = ro.completion_ids[mb, :width], ro.completion_mask[mb, :width], lmask[mb, :width]
            with timer("score"):
                t_logits = teacher_score(
                    teacher.model,
                    [teacher_ctx[idx[j]] for j in mb],
                    comp,
                    cmask,
                    ctx.pad_id,
                    ctx.autocast_dtype,
                )
            with timer("update"):
                s_logits = completion_logits(
                    student, [student_ctx[idx[j]] for j in mb], comp, cmask, ctx.pad_id, ctx.autocast_dtype
                )
                per_token = DIVERGENCES[cfg.divergence](s_logits, t_logits)
                loss = aggregate(per_token, lm, cfg.aggregation, normalizer)
                loss.backward()
            with torch.no_grad():
                step_loss += float(loss)
                tokens.add(cfg.divergence, per_token.detach(), lm)  # the per-token divergence, token mean
                tokens.add("entropy_student", entropy(s_logits.detach()), cmask.float())
                tokens.add("entropy_teacher", entropy(t_logits), cmask.float())
            del t_logits, s_logits, per_token, loss

        # ------------------------------------------------------------ optimizer step, then the EMA teacher
        with timer("optim"):
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            teacher.update(student)
        state.step += 1

        stats = tokens.means()
        lengths = ro.lengths
        record = {
            "stage": ctx.stage,
            "task": task.name,
            "step": state.step,
            "total_steps": total,
            "train/loss": round(step_loss, 6),
            **{f"train/{k}": round(v, 6) for k, v in stats.items()},
            "train/grad_norm": round(float(grad_norm), 6),
            "train/lr": lr,
            "train/completion_len_mean": sum(lengths) / len(lengths),
            "train/completion_len_max": max(lengths),
            "train/truncated_frac": sum(ro.truncated) / len(ro.truncated),
            **timer.pop(),
            "time/step": round(time.perf_counter() - t_step, 4),
        }
        record["train/tokens_per_s"] = round(sum(lengths) / max(record.get("time/rollout", 1e-9), 1e-9), 2)
        ctx.logger.log(record)
        for i in range(min(cfg.log_samples, len(idx))):
            append_jsonl(ctx.samples_log, {"step": state.step, "row": idx[i], "completion": ro.texts[i]})
        bar.update(1)
        bar.set_postfix(
            loss=f"{step_loss:.3f}",
            kl=f"{stats[cfg.divergence]:.3f}",
            len=f"{record['train/completion_len_mean']:.0f}",
        )
        maybe_checkpoint(ctx, teacher, opt, sched, state)
    bar.close()
    return save_final(ctx.train_dir, student, tok, {"method": "sdft", "task": task.name, "steps": total})
