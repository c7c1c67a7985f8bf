"""Multi-process training: FSDP2 over gloo, two processes on the CPU, launched by torchrun through the
same `sdft run` command line, against the one-process run of the same config.

Rollouts are greedy so both runs train on the same completions (sampled rollouts draw one random
stream per rank, so they differ by design). What remains is the order of floating-point sums (gradients
reduced over ranks, token counts summed), hence tolerances instead of equality.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import SMOKE, sdft
from safetensors.torch import load_file

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ARGS = [
    *SMOKE,
    "task=[facts]",
    "rollout.temperature=0",
    "method.max_steps=6",
    "method.prompts_per_step=4",
    "method.micro_batch_size=1",
    "method.optim.lr=3e-3",
    "method.optim.warmup_steps=0",
    "eval.max_items=2",
]
SDFT_ARGS = [*ARGS, "method.save_teacher=true"]


def torchrun(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [*TORCHRUN, "-m", "sdft_cli", "run", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if check and out.returncode:
        tail = f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        raise AssertionError(f"torchrun failed ({out.returncode}):\n{tail}")
    return out


def steps(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def train_dir(run: Path) -> Path:
    return next(run.glob("t01_*/train"))


def weights(run: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(train_dir(run) / name))


def assert_same_training(one: Path, two: Path) -> None:
    a, b = steps(one), steps(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        for key in ("train/loss", "train/grad_norm", "train/completion_len_mean"):
            # logged with 6 decimals; one process steps AdamW fused, two processes step it per tensor
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=3e-6), (ra["step"], key)
    # the weights moved (lr 3e-3 over 6 steps), and both runs moved them the same way
    base = load_file(str(next(Path(os.environ["SDFT_CACHE"]).glob("models/tiny-random-*/model.safetensors"))))
    wa, wb = weights(one, "model/model.safetensors"), weights(two, "model/model.safetensors")
    assert max((wa[k] - base[k]).abs().max().item() for k in wa) > 1e-3
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("one")
    sdft("run", *SDFT_ARGS, "run_dir=one", cwd=cwd)
    return cwd / "one"


def test_two_processes_match_one(one_process, tmp_path):
    """The 2-process run's losses, gradient norms, student and EMA teacher equal the 1-process run's."""
    torchrun(*SDFT_ARGS, "run_dir=two", cwd=tmp_path)
    two = tmp_path / "two"
    assert_same_training(one_process, two)
    ta = weights(one_process, "teacher/teacher.safetensors")
    tb = weights(two, "teacher/teacher.safetensors")
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6)
    assert json.loads((two / "provenance.json").read_text())["starts"][-1]["processes"] == 2
    assert (two / "matrix.json").is_file() and (two / "t01_facts" / "eval" / "manifest.json").is_file()


def test_sft_two_processes_match_one(tmp_path):
    """Also with periodic evaluations and select=best_val: rank 0 scores the gathered student, and every
    rank ends the task with the weights it chose (a random model scores 0: the first evaluation's)."""
    periodic = [
        "eval.every_steps=2",
        "select=best_val",
        "task.facts.max_val=3",
    ]
    args = [*ARGS, "method=sft", *periodic]
    sdft("run", *args, "run_dir=one", cwd=tmp_path)
    torchrun(*args, "run_dir=two", cwd=tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_training(one, two)
    for name in ("validation.jsonl", "selection.json"):
        assert (train_dir(two) / name).read_text() == (train_dir(one) / name).read_text()
    chosen = json.loads((train_dir(two) / "selection.json").read_text())
    assert (chosen["step"], chosen["weights"]) == (2, "best_step_000002")


def _workers(parent: int) -> list:
    import psutil

    kids = [p for p in psutil.Process(parent).children(recursive=True) if "sdft_cli" in " ".join(p.cmdline())]
    return kids


def test_preempted_two_process_run_resumes_in_one(one_process, tmp_path):
    """A signal to one rank checkpoints both at the end of the step and stops the job; the same command
    in one process resumes from that (unsharded) checkpoint and ends where the uninterrupted run does."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [*TORCHRUN, "-m", "sdft_cli", "run", *SDFT_ARGS, f"run_dir={run}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and steps(run)):  # signalled during step 2
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-4000:]
        time.sleep(0.02)
    workers = _workers(proc.pid)
    assert len(workers) == 2
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    rank1.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0, out[-3000:]
    ckpt = next((train_dir(run) / "checkpoints").glob("step_*"))
    stopped = int(ckpt.name.split("_")[1])
    assert 1 <= stopped < 6 and (ckpt / "manifest.json").is_file(), out[-3000:]
    assert "saving a checkpoint" in out

    resumed = sdft("run", *SDFT_ARGS, f"run_dir={run}", cwd=tmp_path)
    assert f"resuming from {ckpt}" in resumed.stdout
    assert_same_training(one_process, run)


def test_a_lora_run_in_two_processes_matches_one(tmp_path):
    """LoRA under FSDP2: the adapters are sharded with their blocks, the EMA teacher adapter follows on
    each rank's shard, the stage model is merged from the gathered state."""
    args = [*SDFT_ARGS, "model.lora.r=4"]
    sdft("run", *args, "run_dir=one", cwd=tmp_path)
    torchrun(*args, "run_dir=two", cwd=tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert_same_training(one, two)
    for name in ("adapter/adapter_model.safetensors", "teacher/teacher.safetensors"):
        a, b = weights(one, name), weights(two, name)
        assert set(a) == set(b) and any("lora_B" in k for k in a)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
