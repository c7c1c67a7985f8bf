"""Crash anywhere: a run SIGKILLed at any point (rollout, teacher scoring, update, evaluation, checkpoint,
manifest or matrix writing) and re-run with the same command ends with exactly the uninterrupted run's
forgetting matrix, student and EMA teacher weights, stage files and step log. Two runs on one run
directory: the second is refused with the owner's host and pid, and a SIGKILLed owner leaves no lock
that blocks the next run. The harness is tests/crash_harness.py; the full campaign,
scripts/crash_campaign.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO
from crash_harness import CAMPAIGN, CI_CHAIN, Fault, Harness, compare


@pytest.fixture(scope="module")
def crash(tmp_path_factory, tiny_model_dir):
    """A harness with the uninterrupted reference run (made once per test session)."""
    harness = Harness(tmp_path_factory.getbasetemp() / "crash")
    harness.make_reference(reuse=True)
    return harness


def test_a_run_killed_in_every_stage_ends_as_if_never_interrupted(crash):
    outcome = crash.trial("ci", CI_CHAIN, max_restarts=2)
    fired = [launch.killed for launch in outcome.launches[: len(CI_CHAIN)]]
    assert fired == [True] * len(CI_CHAIN), list(zip(fired, outcome.landed, strict=True))
    assert outcome.recovered and outcome.restarts == 1, outcome.launches[-1].output[-3000:]
    assert outcome.mismatches == [] and outcome.lost == []


def test_the_comparison_sees_a_changed_weight_a_lost_file_and_a_lost_record(crash, tmp_path):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "copy"
    shutil.copytree(crash.reference, run)
    assert compare(run, crash.reference) == ([], [])
    teacher = run / "t02_mcq" / "train" / "teacher" / "teacher.safetensors"
    weights = load_file(str(teacher))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = torch.nextafter(weights[name].view(-1)[0], torch.tensor(1.0))  # one ulp
    save_file(weights, str(teacher))
    (run / "t01_facts" / "eval" / "predictions" / "facts.jsonl").unlink()
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    mismatches, lost = compare(run, crash.reference)
    assert any("teacher.safetensors: 1 tensors differ" in m for m in mismatches), mismatches
    assert any("predictions/facts.jsonl" in x for x in lost), lost
    assert any("metrics.jsonl lacks 1 records" in x for x in lost), lost


def test_every_stage_has_kill_points_in_the_campaign():
    stages = {f.stage for chain in CAMPAIGN.values() for f in chain}
    expected = {"rollout", "teacher scoring", "update", "evaluation", "checkpoint", "manifest", "matrix"}
    assert expected <= stages
    assert sum(len(chain) for chain in CAMPAIGN.values()) >= 30


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_killed_owner_does_not_block_the_next(crash):
    run = crash.work / "locked"
    shutil.rmtree(run, ignore_errors=True)
    owner = subprocess.Popen(
        crash.command(run, Fault("lock", "sdft_cli.teacher:Teacher.update", 1, "pause")),
        cwd=crash.work,
        env=crash.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        for line in owner.stdout:  # the owner holds the lock, mid-task, until it is killed
            if line.startswith("[crash] paused"):
                break
            assert time.time() < deadline, "the first run did not reach training"
        assert owner.poll() is None
        second = crash.launch(run)
        assert second.rc == 2, second.output[-3000:]
        assert f"is in use by host={socket.gethostname()} pid={owner.pid}" in second.output
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait()
    assert f"pid={owner.pid}" in (run / ".lock.owner").read_text()  # left behind by the killed owner
    third = crash.launch(run)
    assert third.rc == 0, third.output[-3000:]
    assert not (run / ".lock.owner").exists()
    assert compare(run, crash.reference) == ([], [])


@pytest.mark.slow
def test_crash_campaign(tmp_path, tiny_model_dir):
    """Every chain of targeted kills and seeded random kills, through the campaign script."""
    report = tmp_path / "campaign.json"
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "crash_campaign.py"), "--work", str(tmp_path / "w")]
        + ["--json", str(report), "--jobs", "2"],
        capture_output=True,
        text=True,
        timeout=7200,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    totals = json.loads(report.read_text())["totals"]
    assert totals["faults_injected"] >= 30
    assert totals["mismatches"] == 0 and totals["data_lost"] == 0
    assert totals["runs_recovered"] == totals["trials"]
