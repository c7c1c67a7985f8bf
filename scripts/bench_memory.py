"""The memory plan (``sdft plan``) against measured peaks: one real ``sdft run`` per configuration.

Each configuration runs the real pipeline in its own process (a process's peak RSS is a high-water mark):
the base model's evaluation, then two optimizer steps of one task (completions forced to their cap, so
the micro-batch is as long as the plan assumes), its evaluation. The resident set is sampled every 2 ms
per phase (rollout, teacher scoring, student update, optimizer step; ``other`` is loading and
evaluation; a phase's figure includes what earlier phases left resident, so only the overall peak is
compared). Printed per configuration: the plan's peak, the measured one, their ratio. docs/memory.md
holds the figures.

    python scripts/bench_memory.py                      # every configuration (about 10 minutes)
    python scripts/bench_memory.py --only full lora     # some of them
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_machine import PhaseRSS, _rss_now

# what every run shares: one task, 2 steps of 4 prompts in one micro-batch, 64-token completions
COMMON = [
    "task=[toolcall]",
    "method.max_steps=2",
    "method.prompts_per_step=4",
    "method.micro_batch_size=4",
    "method.save_every=0",
    "rollout.max_new_tokens=64",
    "rollout.min_new_tokens=64",
    "eval.max_items=2",
    "eval.preconditions=false",
    "threads=2",
    "logger.progress=false",
]
CONFIGS = {
    "tiny": ["model=tiny_random"],
    "full": [],
    "bf16-moments+offset": ["method.optim.moments=bf16", "method.teacher_storage=offset"],
    "lora": ["model.lora.r=16"],
    "checkpointing": ["method.gradient_checkpointing=true"],
    "all-memory-options": [
        "method.optim.moments=bf16",
        "method.teacher_storage=offset",
        "method.gradient_checkpointing=true",
    ],
    "micro-batch-8": ["method.prompts_per_step=8", "method.micro_batch_size=8"],
    "sft": ["method=sft"],
}
MiB = 2**20


def worker(overrides: list[str], out: str) -> None:
    from sdft_cli.compose import compose
    from sdft_cli.models import load_tokenizer, resolve_model_dir
    from sdft_cli.pipeline import run
    from sdft_cli.tasks import load_task

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose([*overrides, f"run_dir={tmp}/run"])
        load_tokenizer(resolve_model_dir(cfg.model))
        for name, tcfg in cfg.task.items():
            load_task(name, tcfg, train=True)
        runtime = _rss_now()  # what the plan calls the runtime: everything but the model
        phases = PhaseRSS().start()
        run(cfg)
    peaks = phases.stop()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    Path(out).write_text(json.dumps({"peak": peak, "phases": peaks, "runtime": runtime}))


def measure(overrides: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--worker", f.name, "--", *overrides]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(f.name).read_text())


def predict(overrides: list[str]):
    from sdft_cli.compose import compose
    from sdft_cli.models import resolve_model_dir
    from sdft_cli.plan import memory

    cfg = compose(overrides)
    resolve_model_dir(cfg.model)  # built or converted once, before any process is measured
    return memory(cfg, "cpu")


def main() -> int:
    from sdft_cli.memory import RUNTIME_CPU

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if a.worker:
        worker(a.overrides, a.worker)
        return 0
    rows = []
    print(f"{'configuration':<22} {'plan MiB':>9} {'measured':>9} {'plan/meas':>9}  plan's peak phase")
    for name in a.only:
        overrides = [*COMMON, *CONFIGS[name]]
        plan = predict(overrides)
        got = measure(overrides)
        ph = got["phases"]
        ratio = plan.peak / MiB / got["peak"]
        print(
            f"{name:<22} {plan.peak / MiB:>9.0f} {got['peak']:>9.0f} {ratio:>9.3f}  {plan.peak_phase}",
            flush=True,
        )
        rows.append(
            {
                "name": name,
                "overrides": overrides,
                "plan_mib": plan.peak / MiB,
                "plan_parts_mib": {k: v / MiB for k, v in plan.parts.items()},
                "plan_phases_mib": {k: v / MiB for k, v in plan.phases.items()},
                "measured_mib": got["peak"],
                "measured_phases_mib": ph,
                "measured_runtime_mib": got["runtime"],
                "ratio": ratio,
            }
        )
    runtime = max(r["measured_runtime_mib"] for r in rows)
    print(f"runtime before the model loads: {runtime:.0f} MiB measured, {RUNTIME_CPU / MiB:.0f} MiB planned")
    worst = max(abs(r["ratio"] - 1) for r in rows)
    print(f"largest plan/measured deviation: {100 * worst:.1f}% over {len(rows)} configurations")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
