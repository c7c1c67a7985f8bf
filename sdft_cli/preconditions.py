"""The paper's Sec. 3.2 preconditions, measured on the base model before any training.

SDFT can only teach what its teacher knows, and it only avoids forgetting if the teacher stays close to
the base model. For each task: greedy accuracy of the student context (the prompt alone) and of the
teacher context (the prompt plus the row's demonstration in the teacher template), and the teacher's
KL from the base per token on the teacher's own greedy completions, in both directions:
KL(pi(.|x, c, y<t) || pi_0(.|x, y<t)) as the paper's Sec. 3.2 and KL(pi_0 || pi) as RL's Razor. These
are the quantities ``kl_to_base`` reports for every trained model, so an SFT model's values compare.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from sdft_cli.artifacts import atomic_write_json, atomic_write_text, read_json, write_jsonl, write_manifest
from sdft_cli.config import JudgeConfig
from sdft_cli.engines import Engine
from sdft_cli.engines.hf import inference_copy
from sdft_cli.evaluate import EvalContext, evaluate, kl_to_base
from sdft_cli.prompts import encode_messages
from sdft_cli.tasks import Task


def precondition_stage(
    ctx: EvalContext, out_dir: Path, model, templates: dict[str, str], base_results: Path
) -> None:
    """Student vs teacher accuracy and the teacher's KL from the base, on the base model (row 0);
    ``base_results`` is row 0's results.json (the student's accuracies)."""
    t0 = time.perf_counter()
    student = {c["eval_task"]: c["value"] for c in read_json(base_results)}
    copy = inference_copy(model, ctx.dtype)
    engine = ctx.engines.for_eval(copy)  # transformers: the KL below reads the same weights
    rows = measure(
        engine,
        copy,
        ctx.tokenizer,
        list(ctx.tasks.values()),
        templates=templates,
        student=student,
        batch_size=ctx.cfg.batch_size,
        autocast_dtype=ctx.autocast_dtype,
        out_dir=out_dir,
        judge=ctx.cfg.judge,
    )
    ctx.logger.log(
        {
            "stage": 0,
            "event": "preconditions",
            "time/preconditions": round(time.perf_counter() - t0, 3),
            **{f"preconditions/{n}/{k}": r[k] for n, r in rows.items() for k in ("teacher", "student")},
            **{
                f"preconditions/{n}/teacher_kl_to_base": r["teacher_kl_to_base_token"]
                for n, r in rows.items()
            },
        }
    )


def measure(
    engine: Engine,
    model,
    tokenizer,
    tasks: list[Task],
    *,
    templates: dict[str, str],
    student: dict[str, float],
    batch_size: int,
    autocast_dtype: torch.dtype | None,
    out_dir: Path,
    judge: JudgeConfig | None = None,
) -> dict:
    """Teacher accuracy (decoded on ``engine``) and KL from the base (``model``, whose weights the engine
    decodes) per task; ``student`` holds row 0's accuracies.

    Writes the teacher's predictions, ``preconditions.json`` and ``.md``, and the manifest (last).
    """
    rows = {}
    pad = tokenizer.pad_token_id
    for task in tasks:
        template = templates[task.name]
        res = evaluate(engine, tokenizer, task, batch_size=batch_size, teacher_template=template, judge=judge)
        base_ctx = [encode_messages(tokenizer, task.student(ex)) for ex in task.test]
        kl = kl_to_base(
            model,
            model,
            res,
            pad_id=pad,
            batch_size=batch_size,
            autocast_dtype=autocast_dtype,
            base_contexts=base_ctx,
        )
        write_jsonl(out_dir / "predictions" / f"{task.name}.jsonl", res.predictions)
        rows[task.name] = {
            "student": student[task.name],
            "teacher": res.value,
            "teacher_stderr": res.stderr,
            "n": res.n,
            "teacher_kl_to_base_token": kl["kl_to_base_token"],
            "teacher_kl_to_base_seq": kl["kl_to_base_seq"],
            "teacher_kl_model_base_token": kl["kl_model_base_token"],
        }
    atomic_write_json(out_dir / "preconditions.json", rows)
    atomic_write_text(out_dir / "preconditions.md", render_markdown(rows))
    write_manifest(out_dir, {"tasks": list(rows)})
    return rows


def render_markdown(rows: dict) -> str:
    lines = [
        "# Preconditions (paper Sec. 3.2), base model, greedy",
        "",
        "| task | n | student % | teacher % (demonstration in context) "
        "| KL(teacher ‖ base) | KL(base ‖ teacher) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['n']} | {100 * r['student']:.1f} | {100 * r['teacher']:.1f} | "
            f"{r['teacher_kl_model_base_token']:.3f} | {r['teacher_kl_to_base_token']:.3f} |"
        )
    lines += [
        "",
        "KL in nats per token on the teacher's own greedy completions; the trained models' `kl_model_base` "
        "and `kl_to_base` in matrix.json are the same quantities on their completions.",
    ]
    return "\n".join(lines) + "\n"


def print_table(rows: dict, console: Console | None = None) -> None:
    table = Table(title="preconditions (paper Sec. 3.2): base student vs demonstration-conditioned teacher")
    for col in ("task", "n", "student %", "teacher %", "KL(teacher‖base)", "KL(base‖teacher)"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for name, r in rows.items():
        table.add_row(
            name,
            str(r["n"]),
            f"{100 * r['student']:.1f}",
            f"{100 * r['teacher']:.1f}",
            f"{r['teacher_kl_model_base_token']:.3f}",
            f"{r['teacher_kl_to_base_token']:.3f}",
        )
    (console or Console()).print(table)
