"""The real `sdft` entry point end to end on a tiny random model: both methods, resume, sweeps, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import SDFT, SMOKE, sdft, write_jsonl


def manifests(run: Path) -> dict[str, float]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.glob("t*/*/manifest.json")}


def step_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "step" in r]


def step_records(run: Path) -> list[tuple[int, int]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"]) for r in rows if "step" in r]


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_run_end_to_end_then_rerun_skips_everything(method, tmp_path, tiny_model_dir):
    out = sdft("run", *SMOKE, "task=[facts,mcq]", f"method={method}", f"runs_root={tmp_path}", cwd=tmp_path)
    run = tmp_path / "smoke" / f"method={method},task=[facts,mcq]"
    data = json.loads((run / "matrix.json").read_text())
    assert data["rows"] == ["base", "1:facts", "2:mcq"]
    assert data["columns"] == ["facts", "mcq", "capitals", "opposites", "languages"]
    assert all(v is not None for row in data["values"] for v in row)
    for name in ("matrix.csv", "matrix.md", "config.yaml", "provenance.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((run / "matrix.csv").read_text().splitlines()) == 1 + 3 * 5
    assert "1:facts" in out.stdout or "1: facts" in out.stdout
    # checkpoints in HF format, loadable unchanged
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "t02_mcq" / "train" / "model")
    assert sorted(manifests(run)) == [
        "t00_base/eval/manifest.json",
        "t01_facts/eval/manifest.json",
        "t01_facts/train/manifest.json",
        "t02_mcq/eval/manifest.json",
        "t02_mcq/train/manifest.json",
    ]
    steps = step_records(run)
    assert steps == [(1, 1), (1, 2), (2, 1), (2, 2)]

    before = manifests(run)
    sdft("run", *SMOKE, "task=[facts,mcq]", f"method={method}", f"runs_root={tmp_path}", cwd=tmp_path)
    assert manifests(run) == before  # nothing was redone
    assert step_records(run) == steps


def test_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_model_dir):
    # long enough (40 steps) that the kill lands mid-task, right after the first checkpoint
    args = [
        *SMOKE,
        "task=[facts]",
        "method.epochs=100",
        "method.max_steps=40",
        "method.save_every=2",
        "method.save_teacher=true",
        f"runs_root={tmp_path}",
    ]
    proc = subprocess.Popen(
        [*SDFT, "run", *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    run = (
        tmp_path
        / "smoke"
        / "method.epochs=100,method.max_steps=40,method.save_every=2,method.save_teacher=true,task=[facts]"
    )
    deadline = time.time() + 300
    while not list(run.glob("t01_facts/train/checkpoints/step_*/manifest.json")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "t01_facts" / "train" / "manifest.json").exists()  # killed mid-task
    base = manifests(run)["t00_base/eval/manifest.json"]

    out = sdft("run", *args, cwd=tmp_path)
    assert "resuming from" in out.stdout
    assert manifests(run)["t00_base/eval/manifest.json"] == base  # the base evaluation was not redone
    assert [s for st, s in step_records(run) if st == 1] == list(range(1, 41))  # every step exactly once
    assert json.loads((run / "matrix.json").read_text())["rows"] == ["base", "1:facts"]
    assert not (run / "t01_facts" / "train" / "checkpoints").exists()

    # the resumed run is exactly the uninterrupted one: same losses at every step, same final student and
    # EMA teacher weights
    ref = tmp_path / "reference"
    sdft("run", *args, f"run_dir={ref}", cwd=tmp_path)
    assert step_losses(run) == step_losses(ref)
    from safetensors.torch import load_file

    for weights in ("model/model.safetensors", "teacher/teacher.safetensors"):
        a = load_file(str(run / "t01_facts" / "train" / weights))
        b = load_file(str(ref / "t01_facts" / "train" / weights))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    student = load_file(str(run / "t01_facts" / "train" / "model" / "model.safetensors"))
    teacher = load_file(str(run / "t01_facts" / "train" / "teacher" / "teacher.safetensors"))
    shared = student.keys() & teacher.keys()
    assert shared and any(
        not torch.equal(student[k], teacher[k].to(student[k].dtype)) for k in shared
    )  # an EMA


def test_objective_options_from_the_command_line(tmp_path, tiny_model_dir):
    """Reverse KL on the teacher's top-k with a frozen teacher, end to end; the log and the KL-to-base
    diagnostic are written."""
    opts = ["method.divergence=reverse", "method.support=topk", "method.topk=16", "method.teacher=frozen"]
    sdft("run", *SMOKE, "task=[facts]", *opts, "run_dir=objective", cwd=tmp_path)
    run = tmp_path / "objective"
    cfg = (run / "config.yaml").read_text()
    assert "divergence: reverse" in cfg and "support: topk" in cfg and "teacher: frozen" in cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    assert len(steps) == 2 and all(r["train/divergence"] >= 0 and r["train/k3"] >= 0 for r in steps)
    diag = json.loads((run / "t01_facts" / "eval" / "diagnostics.json").read_text())
    assert diag["task"] == "facts" and diag["kl_to_base_token"] >= 0 and diag["n"] == 4
    data = json.loads((run / "matrix.json").read_text())
    assert data["meta"]["kl_to_base"] == {"1:facts": diag["kl_to_base_token"]}
    assert "KL to base" in (run / "matrix.md").read_text()


def test_multirun_sweep_gets_one_directory_per_job(tmp_path, tiny_model_dir):
    sdft("run", "-m", *SMOKE, "task=[facts]", "seed=0,1", f"runs_root={tmp_path}", cwd=tmp_path)
    dirs = sorted(p.name for p in (tmp_path / "smoke").iterdir() if (p / "matrix.json").is_file())
    assert dirs == ["seed=0,task=[facts]", "seed=1,task=[facts]"]


def test_unknown_task_is_one_clear_line(tmp_path):
    out = sdft("run", "task=nonexistent", f"runs_root={tmp_path}", cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "sdft: error: unknown task 'nonexistent' "
        "(available: drop, facts, knowledge, mcq, medical, mirror, odd, science, shift, swap, toolcall, "
        "tooluse)"
    )
    assert not any(tmp_path.iterdir())  # nothing started


def test_bad_value_in_a_sweep_is_caught_before_launch(tmp_path):
    out = sdft("run", "-m", "method.optim.lr=1e-5,-3", f"runs_root={tmp_path}", cwd=tmp_path, check=False)
    assert out.returncode == 2 and "method.optim.lr must be > 0, got -3" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_changed_config_in_the_same_run_dir_is_refused(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "fixed"
    sdft("run", *SMOKE, "task=[facts]", "method.max_steps=1", f"run_dir={run_dir}", cwd=tmp_path)
    out = sdft(
        "run",
        *SMOKE,
        "task=[facts]",
        "method.max_steps=1",
        "method.optim.lr=0.5",
        f"run_dir={run_dir}",
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 2
    assert "holds a run with a different config (method.optim.lr: 1e-05 -> 0.5)" in out.stderr


def test_show_ls_validate_matrix(tmp_path, tiny_model_dir):
    shown = sdft("show", "method=sft", "task=[mcq]", cwd=tmp_path).stdout
    assert "name: sft" in shown and "mcq:" in shown and "facts:" not in shown
    listed = sdft("ls", "task", cwd=tmp_path).stdout
    assert "facts" in listed and "toolcall" in listed and "fictional" in listed
    # `sdft validate` itself runs in tests/test_paper_experiments.py (every experiment x every method)
    for cmd in ("run", "show", "ls", "validate", "matrix"):
        assert "Usage" in sdft(cmd, "--help", cwd=tmp_path).stdout
    missing = sdft("matrix", str(tmp_path / "nope"), cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "matrix.json" in missing.stderr


def test_custom_task_from_a_user_config_dir(tmp_path, tiny_model_dir):
    """Users add tasks in their own directory (Hydra search path) over local files, no code changes."""
    data = tmp_path / "data"
    rows = [{"question": f"Say {w}", "reply": w, "gold": w} for w in ("red", "blue", "green", "pink")]
    write_jsonl(data / "train.jsonl", rows[:3])
    write_jsonl(data / "test.jsonl", rows[3:])
    (tmp_path / "myconf" / "task").mkdir(parents=True)
    (tmp_path / "myconf" / "task" / "colors.yaml").write_text(
        "colors:\n  source: json\n  path: " + str(data) + "\n  scorer: exact_match\n  max_new_tokens: 4\n"
        "  columns: {prompt: question, demonstration: reply, answer: gold}\n"
    )
    search = f"hydra.searchpath=[file://{tmp_path / 'myconf'}]"
    sdft(
        "run",
        *SMOKE,
        "task=[colors]",
        search,
        "method.max_steps=1",
        f"run_dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    data_json = json.loads((tmp_path / "r" / "matrix.json").read_text())
    assert data_json["columns"][0] == "colors" and data_json["rows"] == ["base", "1:colors"]


def test_wandb_offline_logger(tmp_path, tiny_model_dir):
    sdft(
        "run",
        *SMOKE,
        "task=[facts]",
        "method.max_steps=1",
        "logger=wandb",
        f"run_dir={tmp_path / 'r'}",
        cwd=tmp_path,
    )
    runs = list((tmp_path / "r" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_pass_at_k_is_written_after_every_stage(tmp_path, tiny_model_dir):
    sdft(
        "run",
        *SMOKE,
        "task=[facts]",
        "eval.pass_at_k.k=[1,2]",
        "eval.pass_at_k.n=2",
        f"runs_root={tmp_path}",
        cwd=tmp_path,
    )
    (run,) = (tmp_path / "smoke").iterdir()
    for stage in ("t00_base", "t01_facts"):
        (rec,) = json.loads((run / stage / "eval" / "pass_at_k.json").read_text())
        assert rec["task"] == "facts" and rec["n"] == 2 and rec["top_p"] == 0.95
        assert len(rec["correct"]) == 4 and set(rec["pass_at_k"]) == {"1", "2"}
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/facts/pass@2" in r for r in logged)
