"""Measure the SDFT in-context precondition: the student alone vs the demonstration-conditioned teacher.

Greedy accuracy of the student context and of the teacher context (prompt + the row's demonstration in
the teacher template) on each task's test split, plus each prior-capability probe for the student.
Takes the same Hydra overrides as `sdft run`.

    python scripts/measure_precondition.py                         # the embedded default tasks
    python scripts/measure_precondition.py method.teacher_template=paper 'task=[facts]'
"""

from __future__ import annotations

import json
import sys
import time

import torch

from sdft_cli.compose import compose
from sdft_cli.engines import HFEngine
from sdft_cli.engines.hf import inference_copy
from sdft_cli.evaluate import evaluate
from sdft_cli.models import eos_ids, load_model, load_tokenizer, resolve_model_dir
from sdft_cli.names import resolve_teacher_template
from sdft_cli.precision import autocast_dtype, inference_dtype, resolve_device
from sdft_cli.tasks import load_task


def main(overrides: list[str]) -> None:
    cfg = compose(overrides)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    path = resolve_model_dir(cfg.model)
    tok, model = load_tokenizer(path), load_model(path, cfg.model.dtype, device)
    amp = autocast_dtype(cfg.model.precision, device)
    # evaluate exactly as the run's row 0 does (same weights dtype)
    model = inference_copy(model, inference_dtype(cfg.eval.dtype, amp))
    eos = eos_ids(tok, model)
    engine = HFEngine(model, tok, eos, amp)
    batch = cfg.eval.batch_size
    rows = []
    for name, tcfg in cfg.task.items():
        task = load_task(name, tcfg, train=False, max_test=cfg.eval.max_items)
        t0 = time.time()
        template = resolve_teacher_template(
            getattr(cfg.method, "teacher_template", None), tcfg.teacher_template
        )
        student = evaluate(engine, tok, task, batch_size=batch)
        teacher = evaluate(engine, tok, task, batch_size=batch, teacher_template=template)
        rows.append(
            {
                "task": name,
                "n": student.n,
                "student": student.value,
                "teacher": teacher.value,
                "seconds": round(time.time() - t0, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        for kind, res in (("student", student), ("teacher", teacher)):
            for p in res.predictions[:3]:
                print(f"  [{kind}] score={p['score']} {p['prediction'][:160]!r}")
    for name, pcfg in cfg.eval.probes.items():
        task = load_task(name, pcfg, train=False, max_test=cfg.eval.max_items)
        res = evaluate(engine, tok, task, batch_size=batch)
        print(json.dumps({"probe": name, "n": res.n, "base": res.value}), flush=True)
    print("\n| task | n | student (prompt only) | teacher (prompt + demonstration) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['n']} | {100 * r['student']:.1f}% | {100 * r['teacher']:.1f}% |")


if __name__ == "__main__":
    main(sys.argv[1:])
