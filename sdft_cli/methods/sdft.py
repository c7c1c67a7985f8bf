"""SDFT on one task: every optimizer step samples fresh rollouts from the current student (on-policy),
scores them with the demonstration-conditioned teacher, and distils the teacher's per-token
distributions into the student. With ``generate_from=teacher`` the same loop is offline distillation.
Reads top to bottom; `sft.py` is a copy-modify of this file.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sdft_cli import distributed
from sdft_cli.chunked import distill_terms, fused_loss, sampled_logprobs
from sdft_cli.config import SDFTConfig
from sdft_cli.decode import Decoder
from sdft_cli.divergence import k3
from sdft_cli.guard import check_step
from sdft_cli.logger import Timer, TokenMeans, append_jsonl
from sdft_cli.methods.context import TrainContext, maybe_checkpoint, resume
from sdft_cli.models import autocast, autocast_dtype, inference_dtype
from sdft_cli.objective import importance_weights, loss_mask, token_weights
from sdft_cli.rollout import ROLLOUT_BACKENDS, Sampling, rollout_copy, sync_weights
from sdft_cli.score import completion_hidden, output_head
from sdft_cli.tasks import Task, encode_messages, resolve_teacher_template
from sdft_cli.update import (
    Teacher,
    batch_indices,
    build_optimizer,
    save_final,
    step_seed,
    steps_per_task,
)


def use_importance_sampling(cfg: SDFTConfig, backend: str, temperature: float) -> bool:
    """TIS is on when asked, or (auto) when another engine than the trainer samples the rollouts
    (and they are sampled at all: greedy rollouts have no sampler probabilities to correct)."""
    if cfg.importance_sampling == "on":
        return True
    return cfg.importance_sampling == "auto" and backend != "hf" and temperature > 0


def train_task(ctx: TrainContext, task: Task) -> Path:
    cfg: SDFTConfig = ctx.method  # type: ignore[assignment]
    student, tok = ctx.model, ctx.tokenizer
    spec = cfg.spec()
    timer = Timer()

    # ---------------------------------------------------------------- contexts, tokenised once
    template = resolve_teacher_template(cfg.teacher_template, task.cfg.teacher_template)
    student_ctx = [encode_messages(tok, task.student(ex)) for ex in task.train]
    teacher_ctx = [encode_messages(tok, task.teacher(ex, template)) for ex in task.train]
    tis = use_importance_sampling(cfg, ctx.rollout.backend, ctx.rollout.temperature)
    sampling = Sampling(
        max_new_tokens=ctx.rollout.max_new_tokens or task.cfg.max_new_tokens,
        temperature=ctx.rollout.temperature,
        top_p=ctx.rollout.top_p,
        top_k=ctx.rollout.top_k,
        batch_size=ctx.rollout.batch_size,
        logprobs=tis,
        min_new_tokens=ctx.rollout.min_new_tokens,
        decoder=ctx.rollout.decoder,
    )
    generate = ROLLOUT_BACKENDS[ctx.rollout.backend]
    on_policy = cfg.generate_from == "student"
    sample_ctx = student_ctx if on_policy else teacher_ctx

    # ---------------------------------------------------------------- teacher, engine, optimizer, resume
    dist = distributed.current()
    total = steps_per_task(cfg, len(task.train))
    student.train()
    # The teacher starts from the current student (the previous task's result), not the hub base.
    teacher = Teacher(cfg.teacher, student, cfg.ema_alpha)
    if ctx.teacher_init is not None:  # a teacher from other weights (re-invocation: the base model)
        teacher.load_weights(ctx.teacher_init, ctx.trust_remote_code)
    sampler = student if on_policy else teacher.model
    device = ctx.device or next(student.parameters()).device
    if ctx.rollout.backend == "vllm":
        from sdft_cli.vllm_engine import rollout_engine

        engine = rollout_engine(ctx, sampler, inference_dtype(ctx.rollout.dtype, ctx.autocast_dtype))
    else:  # copied before sharding: each rank decodes with whole weights
        dtype = inference_dtype(ctx.rollout.dtype, ctx.autocast_dtype)
        engine = rollout_copy(sampler, dtype, always=dist.enabled, decoder=ctx.rollout.decoder)
        engine = engine if isinstance(engine, Decoder) else engine.to(device)
    if dist.enabled:
        distributed.shard(student, device)
        teacher.shard(device)
    opt, sched = build_optimizer(student, cfg.optim, total)
    state = resume(ctx, teacher, opt, sched, total)
    terms = distill_terms(spec)
    auto = cfg.teacher_precision == "auto"
    score_amp = ctx.autocast_dtype if auto else autocast_dtype(cfg.teacher_precision, device)

    bar = tqdm(
        total=total, initial=state.step, desc=f"{cfg.name} {task.name}", disable=not ctx.progress, leave=False
    )
    while state.step < total:
        t_step = time.perf_counter()
        batch = batch_indices(len(task.train), cfg.prompts_per_step, state.step, (ctx.seed, ctx.stage))
        idx = distributed.my_share(batch)  # the whole batch in one process

        # ------------------------------------------------------------ rollout: the student samples
        torch.manual_seed(step_seed(ctx.seed, ctx.stage, state.step, dist.rank))
        with timer("rollout"):
            sync_weights(engine, sampler)
            ro = generate(
                engine, tok, [sample_ctx[i] for i in idx], sampling, ctx.eos_ids, ctx.autocast_dtype
            )
            if isinstance(engine, Decoder):
                engine.release()  # rebuilt by the next sync; not resident during scoring and the update
        lmask = loss_mask(ro.completion_mask, cfg.skip_first_tokens)
        # normalised over the whole batch (every rank's tokens): gradients are summed over ranks
        normalizer = (
            float(len(batch))
            if cfg.aggregation == "seq_mean"
            else distributed.sum_floats([float(lmask.sum())])[0]
        )

        # ------------------------------------------------------------ score + update, per micro-batch
        step_loss, tokens, is_w, bad_rows = 0.0, TokenMeans(), [], []
        for start in range(0, len(idx), cfg.micro_batch_size):
            mb = list(range(start, min(start + cfg.micro_batch_size, len(idx))))
            width = max(1, int(ro.completion_mask[mb].sum(-1).max()))  # trim shared right padding
            comp, cmask, lm = ro.completion_ids[mb, :width], ro.completion_mask[mb, :width], lmask[mb, :width]
            # completion tokens (up to EOS), flattened row by row: the loss sees only these
            sel = cmask.bool().to(device)
            targets = comp.to(device)[sel]
            seq_ids = torch.arange(len(mb), device=device).unsqueeze(-1).expand(sel.shape)[sel]
            with timer("score"), torch.no_grad():
                t_ctx = [teacher_ctx[idx[j]] for j in mb]
                h_t = completion_hidden(teacher.model, t_ctx, comp, cmask, ctx.pad_id, score_amp)[sel]
                head_t, _ = output_head(teacher.model)  # after the forward: a sharded root is gathered
                if ctx.autocast_dtype is None:  # scored in bf16, read by the fp32 loss
                    h_t = h_t.to(head_t.weight.dtype)
            with timer("update"):
                s_ctx = [student_ctx[idx[j]] for j in mb]
                h_s = completion_hidden(student, s_ctx, comp, cmask, ctx.pad_id, ctx.autocast_dtype)[sel]
                head_s, head_params = output_head(student)
                weights = token_weights(lm, cfg.aggregation, normalizer).to(device)
                if tis:  # one truncated importance weight per sequence, from the sampler's log-probs
                    with autocast(ctx.autocast_dtype, device):
                        lp = sampled_logprobs(
                            h_s.detach(), head_s, targets, sampling.temperature, cfg.loss_chunk_size
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
                        head_params,
                        h_t,
                        head_t,
                        targets,
                        weights[sel],
                        terms,
                        cfg.loss_chunk_size,
                        seq_ids,
                        rb=spec.estimator == "rb",
                    )
                out.loss.backward()
            if teacher.model is not student:
                distributed.reshard(teacher.model)
            with torch.no_grad():
                step_loss += float(out.loss)
                if not math.isfinite(step_loss) and not bad_rows:  # the first micro-batch that went bad
                    bad_rows = [idx[j] for j in mb]
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
            apply = check_step(cfg.optim, state, step_loss, grad_norm, where, bad_rows or batch, ctx.logger)
            if apply:  # a skipped step leaves the weights, optimizer and teacher as they were
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if apply:
                teacher.update(student)
        state.step += 1

        stats = tokens.means()
        (step_loss,) = distributed.sum_floats([step_loss])
        lengths = sum(distributed.gather(ro.lengths), [])
        truncated = sum(distributed.gather(ro.truncated), [])
        record = {
            "stage": ctx.stage,
            "task": task.name,
            "step": ctx.step_offset + state.step,
            "total_steps": total,
            "train/loss": round(step_loss, 6),
            **{f"train/{k}": round(v, 6) for k, v in stats.items()},
            "train/grad_norm": round(distributed.scalar(grad_norm), 6),
            "train/skipped_steps": len(state.skipped),
            "train/lr": lr,
            "train/completion_len_mean": sum(lengths) / len(lengths),
            "train/completion_len_max": max(lengths),
            "train/truncated_frac": sum(truncated) / len(truncated),
            **timer.pop(),
            "time/step": round(time.perf_counter() - t_step, 4),
        }
        if is_w:
            w = torch.cat(distributed.gather(torch.cat(is_w)))
            record.update({"train/is_min": float(w.min()), "train/is_mean": float(w.mean())})
            record["train/is_max"] = float(w.max())
        record["train/tokens_per_s"] = round(sum(lengths) / max(record.get("time/rollout", 1e-9), 1e-9), 2)
        if device.type == "cuda":  # the step's peak, then reset for the next
            record["mem/peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            torch.cuda.reset_peak_memory_stats(device)
        ctx.logger.log(record)
        for i in range(min(cfg.log_samples, len(idx)) if dist.main else 0):
            append_jsonl(ctx.samples_log, {"step": state.step, "row": idx[i], "completion": ro.texts[i]})
        bar.update(1)
        bar.set_postfix(
            loss=f"{step_loss:.3f}",
            div=f"{stats['divergence']:.3f}",
            len=f"{record['train/completion_len_mean']:.0f}",
        )
        maybe_checkpoint(ctx, teacher, opt, sched, state)
    bar.close()
    info = {"method": cfg.name, "task": task.name, "steps": total, "skipped_steps": state.skipped}
    return save_final(ctx.train_dir, student, tok, info, teacher if cfg.save_teacher else None)
