"""One SDFT optimizer step, ours against TRL's ``SDFTTrainer``, on the same work (docs/performance.md).

Both run the harness in ``../shared/bench/trl_sdft`` defines: SmolLM2-135M-Instruct, its 32 prompt /
demonstration pairs and teacher template, 4 prompts x 1 rollout per step, completions forced to 64
tokens, full-vocabulary forward KL, an EMA teacher (rate 0.01), the first 3 completion tokens masked,
AdamW at a constant 1e-5, clip 1.0, 2 threads. TRL runs in its own virtual environment (the harness
README installs it); ours runs in this one. Each implementation runs in its own process (peak RSS is a
process high-water mark), alternating, ``--rounds`` times each; SFT (ours, same batch and optimizer)
runs after them for the SDFT/SFT cost ratio.

    python scripts/bench_step.py --trl-python ~/.venvs/trl-anchor/bin/python
    python scripts/bench_step.py --trl-python ~/.venvs/trl-anchor/bin/python --bf16-autocast
    python scripts/bench_step.py --no-trl                 # ours only (SDFT and SFT)
    python scripts/bench_step.py --no-trl --ours-moments bf16 --ours-teacher-storage offset   # memory options
    python scripts/bench_step.py --trl-python ~/.venvs/trl-anchor/bin/python --lora 16       # LoRA, both

Printed per implementation: median step time (first step excluded), peak RSS, completion tokens/s, the
time split (rollout / teacher scoring / student forward+backward / optimizer+EMA), the step's FLOPs and
the time those take at this machine's measured matmul throughput (the roofline); then ours/TRL ratios,
and the SDFT/SFT wall-clock ratio beside the FLOPs ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_machine import PhaseRSS, _peak_rss, _rss_now, matmul_gflops, memory_gbs, step_flops

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO.parent / "shared" / "bench" / "trl_sdft"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="HF model dir (default: the harness's conversion, else ours)")
    ap.add_argument("--trl-python", default=os.path.expanduser("~/.venvs/trl-anchor/bin/python"))
    ap.add_argument(
        "--trl-dir", default=str(HARNESS), help="the TRL harness (bench_trl_sdft.py, anchor_data.py)"
    )
    ap.add_argument("--no-trl", action="store_true", help="measure ours only")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="runs of each implementation, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--completion-len", type=int, default=64)
    ap.add_argument("--bf16-autocast", action="store_true", help="bf16 autocast over fp32 weights (both)")
    ap.add_argument(
        "--ours-inference",
        choices=["bf16", "fp32"],
        default="bf16",
        help="ours: rollouts from a bf16 copy and teacher scoring under bf16 autocast (rollout.dtype, "
        "method.teacher_precision) while the student trains in fp32; fp32 = everything in fp32",
    )
    ap.add_argument("--ours-checkpointing", action="store_true", help="ours: method.gradient_checkpointing")
    ap.add_argument(
        "--ours-moments", choices=["fp32", "bf16"], default="fp32", help="ours: method.optim.moments"
    )
    ap.add_argument(
        "--ours-teacher-storage",
        choices=["copy", "offset"],
        default="copy",
        help="ours: method.teacher_storage (offset: the EMA teacher as a bf16 offset from the student)",
    )
    ap.add_argument("--ours-lora", type=int, default=0, help="ours: model.lora.r (0: full fine-tuning)")
    ap.add_argument(
        "--ours-loss-chunk", type=int, default=256, help="ours: method.loss_chunk_size (tokens per chunk)"
    )
    ap.add_argument(
        "--lora",
        type=int,
        default=0,
        help="both: LoRA of this rank (alpha 32, every attention and MLP projection); TRL gets the same "
        "peft_config (scripts/trl_lora.py) and keeps its EMA teacher as a second adapter, as ours does",
    )
    ap.add_argument(
        "--ours-decoder",
        choices=["auto", "generate"],
        default="auto",
        help="ours: rollout.decoder (auto: sdft_cli.engines.decode's loop; generate: transformers generate)",
    )
    ap.add_argument("--json-out", default="", help="write every measurement to this file")
    ap.add_argument("--worker", choices=["sdft", "sft"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- worker: our step


def anchor(trl_dir: str):
    sys.path.insert(0, trl_dir)
    from anchor_data import PAIRS, TEACHER_TEMPLATE

    return PAIRS, TEACHER_TEMPLATE.replace("{privileged_context}", "{demonstration}")


def worker(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    from sdft_cli.artifacts import RunLayout
    from sdft_cli.config import LoggerConfig, OptimConfig, RolloutConfig, SDFTConfig, SFTConfig, TaskConfig
    from sdft_cli.engines import Engines
    from sdft_cli.logger import RunLogger
    from sdft_cli.methods import METHODS
    from sdft_cli.methods.context import TrainContext
    from sdft_cli.models import eos_ids, generation_config, load_model, load_tokenizer
    from sdft_cli.precision import autocast_dtype
    from sdft_cli.prompts import encode_messages, encode_target
    from sdft_cli.tasks import Example, Task

    rss_start = _rss_now()
    pairs, template = anchor(a.trl_dir)
    phases = PhaseRSS().start() if not os.environ.get("BENCH_NO_PHASES") else None
    torch.manual_seed(42)
    model = load_model(a.model, "float32")
    tok = load_tokenizer(a.model)
    eos = eos_ids(tok, generation_config(a.model))
    rss_after_init = _rss_now()
    examples = [Example(i, q, d, None) for i, (q, d) in enumerate(pairs)]
    task = Task("anchor", TaskConfig(path="anchor", max_new_tokens=a.completion_len), train=examples)
    optim = OptimConfig(
        lr=1e-5,
        warmup_steps=0,
        schedule="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        moments=a.ours_moments,
    )
    if a.ours_lora:
        from sdft_cli import lora
        from sdft_cli.config import LoraConfig

        lora.attach(model, LoraConfig(r=a.ours_lora), teacher=a.worker == "sdft", seed=0)
    shared = dict(
        prompts_per_step=a.batch_size,
        micro_batch_size=a.batch_size,
        max_steps=a.steps,
        epochs=1000.0,
        save_every=0,
        log_samples=0,
        optim=optim,
        loss_chunk_size=a.ours_loss_chunk,
    )
    bf16_inference = a.ours_inference == "bf16"
    shared["gradient_checkpointing"] = a.ours_checkpointing
    if a.ours_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if a.worker == "sdft":
        method = SDFTConfig(
            teacher="ema",
            ema_alpha=0.01,
            skip_first_tokens=3,
            teacher_template=template,
            teacher_precision="bf16" if bf16_inference else "auto",
            teacher_storage=a.ours_teacher_storage,
            **shared,
        )
    else:
        method = SFTConfig(**shared)
    rollout = RolloutConfig(
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_new_tokens=a.completion_len,
        min_new_tokens=a.completion_len,
        batch_size=a.batch_size,
        dtype="bfloat16" if bf16_inference else "auto",
        decoder=a.ours_decoder,
    )
    amp = autocast_dtype("bf16" if a.bf16_autocast else "fp32", torch.device("cpu"))
    records, ends = [], []
    with tempfile.TemporaryDirectory() as tmp:
        log = RunLogger(LoggerConfig(progress=False), RunLayout(Path(tmp)), {}, name="bench")
        inner = log.log

        def timed_log(record: dict) -> None:  # the step ends when its record is logged
            ends.append(time.perf_counter())
            records.append(record)
            inner(record)

        log.log = timed_log
        engines = Engines(rollout, tokenizer=tok, eos_ids=eos, autocast_dtype=amp, seed=0)
        ctx = TrainContext(
            model,
            tok,
            method,
            rollout,
            amp,
            eos,
            seed=0,
            stage=1,
            train_dir=Path(tmp) / "train",
            logger=log,
            engines=engines,
            progress=False,
        )
        t0 = time.perf_counter()
        METHODS[method.name].train(ctx, task)
    peaks = phases.stop() if phases else {}
    walls = [b - a_ for a_, b in zip([t0, *ends[:-1]], ends, strict=True)]
    student_len = [len(encode_messages(tok, task.student(ex))) for ex in examples]
    teacher_len = [len(encode_messages(tok, task.teacher(ex, template))) for ex in examples]
    target_len = [len(encode_target(tok, task.student(ex), ex.demonstration, eos)) for ex in examples]
    return {
        "impl": "ours",
        "method": a.worker,
        "steps": [
            {
                "wall_s": w,
                "rollout_s": r.get("time/rollout", 0.0),
                "score_s": r.get("time/score", 0.0),
                "update_s": r.get("time/update", 0.0),
                "optim_s": r.get("time/optim", 0.0),
                "loss": r["train/loss"],
                "completion_tokens": r["train/completion_len_mean"] * a.batch_size,
            }
            for w, r in zip(walls, records, strict=True)
        ],
        "rss_mb": {"start": rss_start, "after_init": rss_after_init, "peak": _peak_rss(), "phases": peaks},
        "lengths": {"student": student_len, "teacher": teacher_len, "sft_target": target_len},
    }


# ----------------------------------------------------------------------------- runs


def run_ours(a, method: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--worker", method, "--out", f.name, "--model", a.model]
        cmd += ["--trl-dir", a.trl_dir, "--steps", str(a.steps), "--threads", str(a.threads)]
        cmd += ["--batch-size", str(a.batch_size), "--completion-len", str(a.completion_len)]
        cmd += ["--bf16-autocast"] if a.bf16_autocast else []
        cmd += ["--ours-inference", a.ours_inference]
        cmd += ["--ours-checkpointing"] if a.ours_checkpointing else []
        cmd += ["--ours-decoder", a.ours_decoder, "--ours-moments", a.ours_moments]
        cmd += ["--ours-teacher-storage", a.ours_teacher_storage, "--ours-lora", str(a.ours_lora)]
        cmd += ["--ours-loss-chunk", str(a.ours_loss_chunk)]
        subprocess.run(cmd, check=True, env=_env(a), stdout=subprocess.DEVNULL)
        return json.loads(Path(f.name).read_text())


def run_trl(a) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [a.trl_python, str(Path(a.trl_dir) / "bench_trl_sdft.py"), "--model", a.model]
        if a.lora:  # the same harness, its trainer given a peft_config
            cmd = [a.trl_python, str(Path(__file__).with_name("trl_lora.py")), "--trl-dir", a.trl_dir]
            cmd += ["--r", str(a.lora), "--alpha", "32", "--", "--model", a.model]
        cmd += ["--max-steps", str(a.steps), "--threads", str(a.threads), "--json-out", f.name]
        cmd += ["--warmup-steps", str(a.warmup_steps), "--batch-size", str(a.batch_size)]
        cmd += ["--completion-len", str(a.completion_len)]
        cmd += ["--bf16-autocast"] if a.bf16_autocast else []
        env = {**_env(a), "TRL_EXPERIMENTAL_SILENCE": "1"}
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, cwd=a.trl_dir)
        raw = json.loads(Path(f.name).read_text())
    steps = []
    for s in raw["steps"]:
        loss_fn = s["compute_loss_s"] - s["student_fwd_s"] - s["teacher_fwd_s"]
        steps.append(
            {
                "wall_s": s["wall_s"],
                "rollout_s": s["gen_s"],
                "score_s": s["teacher_fwd_s"],
                "update_s": s["student_fwd_s"] + loss_fn + s["backward_s"],
                "optim_s": s["clip_s"] + s["optimizer_s"] + s["post_opt_s"],
                "completion_tokens": sum(s["completion_lengths"]),
            }
        )
    losses = [x["loss"] for x in raw["logs"] if "loss" in x]
    for s, loss in zip(steps, losses, strict=False):
        s["loss"] = loss
    return {"impl": "trl", "method": "sdft", "steps": steps, "rss_mb": raw["rss_mb"]}


def _env(a) -> dict:
    threads = str(a.threads)
    quiet = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {
        **os.environ,
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        **quiet,
        "WANDB_MODE": "disabled",
    }


# ----------------------------------------------------------------------------- summary


def summarise(runs: list[dict], warmup: int) -> dict:
    """Medians over every run's measured steps (the first ``warmup`` of each run excluded)."""
    steps = [s for r in runs for s in r["steps"][warmup:]]
    med = {
        k: statistics.median(s[k] for s in steps)
        for k in ("wall_s", "rollout_s", "score_s", "update_s", "optim_s")
    }
    tokens = statistics.median(s["completion_tokens"] for s in steps)
    per_run = [statistics.median(s["wall_s"] for s in r["steps"][warmup:]) for r in runs]
    return {
        **med,
        "per_run_s": per_run,
        "tokens_per_s": tokens / med["wall_s"],
        "peak_rss_mb": max(r["rss_mb"]["peak"] for r in runs),
        "phases": runs[0]["rss_mb"].get("phases", {}),
        "loss": [round(s.get("loss", float("nan")), 4) for s in runs[0]["steps"]],
    }


def row(name: str, r: dict, roof: float) -> str:
    cells = [r["wall_s"], r["tokens_per_s"], r["peak_rss_mb"], r["rollout_s"], r["score_s"], r["update_s"]]
    cells += [r["optim_s"], roof, r["wall_s"] / roof]
    fmt = ["7.3f", "6.1f", "8.0f", "8.3f", "8.3f", "8.3f", "8.3f", "9.3f", "7.1f"]
    runs = ", ".join(f"{x:.2f}" for x in r["per_run_s"])
    return f"{name:6} " + " ".join(format(c, f) for c, f in zip(cells, fmt, strict=True)) + f"  {runs}"


def ratio(a: dict, b: dict, key: str) -> str:
    return f"{a[key] / b[key]:.3f}" if b[key] else "-"


def show(a, ours: dict, trl: dict | None, sft: dict, flops: dict, peak: float, bandwidth: float) -> None:
    prec = "bf16 autocast" if a.bf16_autocast else "fp32"
    inference = "bf16" if a.bf16_autocast or a.ours_inference == "bf16" else "fp32"
    print(f"\n## SDFT step: {prec}, {a.batch_size} prompts x {a.completion_len} tokens, {a.threads} threads")
    print(
        f"{a.steps} steps x {a.rounds} runs each, alternating (first {a.warmup_steps} of each run excluded)"
    )
    print(
        f"ours: student fp32 weights{' + bf16 autocast' if a.bf16_autocast else ''}; rollouts and teacher "
        f"scoring in {inference}; rollout.decoder={a.ours_decoder}; "
        f"gradient checkpointing {'on' if a.ours_checkpointing else 'off'}; AdamW moments {a.ours_moments}; "
        f"teacher {a.ours_teacher_storage}; loss chunk {a.ours_loss_chunk}"
        + (f"; LoRA r={a.ours_lora}" if a.ours_lora else "")
    )
    mm = "bf16" if a.bf16_autocast else "fp32"
    print(f"machine: matmul {peak:.1f} GFLOP/s ({mm}), memory {bandwidth:.1f} GB/s")
    roof = flops["sdft"] / (peak * 1e9)
    head = ["s/step", "tok/s", "peak MiB", "rollout", "teacher", "stud f+b", "opt+EMA", "roofline", "x roof"]
    widths = [7, 6, 8, 8, 8, 8, 8, 9, 7]
    print(f"{'':6} " + " ".join(f"{h:>{w}}" for h, w in zip(head, widths, strict=True)) + "  runs (s/step)")
    print(row("ours", ours, roof))
    if trl:
        print(row("TRL", trl, roof))
    print(
        f"FLOPs per step: rollout {flops['rollout']:.3g}, teacher {flops['score']:.3g}, "
        f"student f+b {flops['update']:.3g}, total {flops['sdft']:.3g}"
    )
    parts = ", ".join(f"{p} {flops[p] / (peak * 1e9):.3f}" for p in ("rollout", "score", "update"))
    decode = flops["decode_bytes"] / (bandwidth * 1e9)
    print(
        f"roofline per phase (s): {parts}; decoding reads the weights once per token: {decode:.3f} s "
        f"at {bandwidth:.1f} GB/s ({inference} weights)"
    )
    if ours["phases"]:
        print(
            "ours, peak RSS per phase (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in ours["phases"].items())
        )
    if trl:
        keys = [("step time", "wall_s"), ("peak RSS", "peak_rss_mb"), ("rollout", "rollout_s")]
        keys += [("teacher", "score_s"), ("student f+b", "update_s"), ("opt+EMA", "optim_s")]
        print("ours/TRL: " + ", ".join(f"{n} {ratio(ours, trl, k)}" for n, k in keys))
    wall_ratio, flop_ratio = ours["wall_s"] / sft["wall_s"], flops["sdft"] / flops["sft"]
    print(
        f"ours SFT: {sft['wall_s']:.3f} s/step, peak {sft['peak_rss_mb']:.0f} MiB; SDFT/SFT wall-clock "
        f"{wall_ratio:.2f} vs FLOPs {flop_ratio:.2f} (wall/FLOPs {wall_ratio / flop_ratio:.2f})"
    )
    print(f"losses, first run: ours {ours['loss']}" + (f"; TRL {trl['loss']}" if trl else ""))


def main() -> int:
    a = parse_args()
    if a.lora:
        a.ours_lora = a.lora
    if not a.model:
        harness_model = Path.home() / ".cache" / "sdft-bench" / "smollm2-hf"
        if harness_model.is_dir():
            a.model = str(harness_model)
        else:
            from sdft_cli.config import ModelConfig
            from sdft_cli.models import resolve_model_dir

            a.model = str(resolve_model_dir(ModelConfig(name="smollm2", source="smollm2")))
    if a.worker:
        Path(a.out).write_text(json.dumps(worker(a)))
        return 0
    ours, trl = [], []
    for i in range(a.rounds):  # alternate, and alternate who goes first
        first_ours = i % 2 == 0 or a.no_trl
        for impl in ("ours", "trl") if first_ours else ("trl", "ours"):
            if impl == "ours":
                ours.append(run_ours(a, "sdft"))
            elif not a.no_trl:
                trl.append(run_trl(a))
            print(f"# round {i + 1}/{a.rounds}: {impl} done", flush=True)
    sft = run_ours(a, "sft")
    bf16_weights = a.bf16_autocast or a.ours_inference == "bf16"
    flops = step_flops(a.model, ours[0]["lengths"], a.batch_size, a.completion_len, 2 if bf16_weights else 4)
    peak = matmul_gflops(a.threads, a.bf16_autocast)
    bandwidth = memory_gbs(a.threads)
    summary = {
        "ours": summarise(ours, a.warmup_steps),
        "trl": summarise(trl, a.warmup_steps) if trl else None,
        "sft": summarise([sft], a.warmup_steps),
    }
    show(a, summary["ours"], summary["trl"], summary["sft"], flops, peak, bandwidth)
    if a.json_out:
        Path(a.json_out).write_text(
            json.dumps(
                {
                    "args": vars(a),
                    "summary": summary,
                    "flops": flops,
                    "matmul_gflops": peak,
                    "runs": {"ours": ours, "trl": trl, "sft": sft},
                },
                indent=1,
            )  # fmt: skip
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
