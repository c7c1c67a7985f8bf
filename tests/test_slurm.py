"""hydra/launcher=slurm against a real one-node Slurm cluster (scripts/slurm_cluster.sh starts it): a -m
sweep through sbatch, and a job signalled as at its time limit that checkpoints, is requeued by Slurm
and resumes without redoing finished stages."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SDFT, SMOKE

pytestmark = pytest.mark.slurm

# what conf/local/slurm.yaml would hold on this cluster: no GPUs, one core and a little memory per job
SITE = [
    "hydra/launcher=slurm",
    "hydra.launcher.gpus_per_node=null",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=4",
    "hydra.launcher.timeout_min=20",
]


@pytest.fixture(scope="module")
def cluster():
    out = subprocess.run(
        [str(REPO / "scripts" / "slurm_cluster.sh"), "up"], capture_output=True, text=True, timeout=600
    )
    if out.returncode != 0:
        pytest.fail(f"the one-node Slurm cluster did not start:\n{out.stdout}\n{out.stderr}")
    return True


def sweep(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*SDFT, "run", "-m", *SITE, *SMOKE, *args, f"runs_root={tmp_path}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ,
    )


def steps(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").is_file():
        return []
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "step" in r]


def job_ids() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_a_sweep_runs_every_job_through_sbatch(tmp_path, cluster, tiny_model_dir):
    proc = sweep(tmp_path, "seed=0,1", "task=[facts]")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    for seed in (0, 1):
        run = tmp_path / "smoke" / f"seed={seed},task=[facts]"
        data = json.loads((run / "matrix.json").read_text())
        assert data["rows"] == ["base", "1:facts"], seed
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == seed
    # each job ran under Slurm: submitit's folder holds one log per array task, named <array job>_<task>
    logs = sorted((tmp_path / "smoke" / ".submitit").glob("*/*_log.out"))
    assert [p.parent.name.split("_")[1] for p in logs] == ["0", "1"]
    assert all("[sdft] run directory" in p.read_text() for p in logs)


def test_a_job_signalled_at_its_time_limit_is_requeued_and_resumes(tmp_path, cluster, tiny_model_dir):
    args = ["seed=0", "task=[facts]", "method.epochs=100", "method.max_steps=30", "method.save_every=0"]
    before = set(job_ids())
    proc = sweep(tmp_path, *args)
    run = tmp_path / "smoke" / "method.epochs=100,method.max_steps=30,method.save_every=0,seed=0,task=[facts]"
    deadline = time.time() + 300
    while len(steps(run)) < 3:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not start under Slurm"
        time.sleep(0.2)
    (job,) = set(job_ids()) - before
    base_manifest = (run / "t00_base" / "eval" / "manifest.json").stat().st_mtime_ns
    # what Slurm sends signal_delay_s before the time limit (submitit's preemption signal)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    # Slurm holds a requeued job for a while (BeginTime); let it start now, as a free node would
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True)
        if state.stdout.split() == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            break
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    log = "\n".join(p.read_text() for p in (tmp_path / "smoke" / ".submitit").glob("*/*_log.*"))
    assert "USR2: saving a checkpoint at the end of this optimizer step" in log
    assert "Requeued job" in log or "requeue" in log.lower()
    assert "resuming from" in log
    assert steps(run) == list(range(1, 31))  # every step exactly once in the log
    assert (run / "t00_base" / "eval" / "manifest.json").stat().st_mtime_ns == base_manifest
    assert json.loads((run / "matrix.json").read_text())["rows"] == ["base", "1:facts"]


def test_a_job_with_two_tasks_trains_as_two_processes(tmp_path, cluster, tiny_model_dir):
    """hydra.launcher.tasks_per_node=2: one job, two Slurm tasks, which join one FSDP2 process group
    (submitit's TorchDistributedEnvironment) and train together; rank 0 writes the run."""
    proc = sweep(
        tmp_path, "seed=0", "task=[facts]", "rollout.temperature=0", "hydra.launcher.tasks_per_node=2"
    )
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    (matrix,) = (tmp_path / "smoke").glob("*/matrix.json")
    run = matrix.parent
    assert json.loads(matrix.read_text())["rows"] == ["base", "1:facts"]
    assert json.loads((run / "provenance.json").read_text())["starts"][-1]["processes"] == 2
    assert steps(run) == [1, 2]  # logged once, by rank 0
    logs = sorted((tmp_path / "smoke" / ".submitit").glob("*/*_log.out"))
    assert [p.name.split("_")[-2] for p in logs] == ["0", "1"]  # one log per task
