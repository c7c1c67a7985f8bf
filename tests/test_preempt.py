"""Preemption: a signal during training is held to the end of the step, a checkpoint is saved, the run
exits (or the previous handler, submitit's, takes over), and the same command resumes exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import SDFT, SMOKE, sdft

from sdft_cli import preempt


def test_signals_are_held_during_training_and_handed_on_after_the_step():
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        with preempt.deferred():
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert preempt.requested() and calls == []  # held, the step goes on
            preempt.act()
            assert calls == [signal.SIGUSR2] and not preempt.requested()
        os.kill(os.getpid(), signal.SIGUSR2)  # outside training: straight to the handler
        time.sleep(0.05)
        assert calls == [signal.SIGUSR2, signal.SIGUSR2]
        # a signal after the last step is acted on when training ends
        with preempt.deferred():
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
        assert len(calls) == 3
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_held_ctrl_c_exits_with_130_and_a_second_one_stops_at_once():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with preempt.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                assert preempt.requested()  # held: the step goes on
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
        with preempt.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            with pytest.raises(SystemExit) as e:
                preempt.act()
            assert e.value.code == 130
    finally:
        signal.signal(signal.SIGINT, previous)


def test_without_a_handler_the_held_signal_exits_with_128_plus_its_number():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with preempt.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            try:
                preempt.act()
            except SystemExit as e:
                assert e.code == 128 + signal.SIGTERM
            else:
                raise AssertionError("no exit")
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_the_process_ignores_stays_ignored():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with preempt.deferred():
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
            assert not preempt.requested()  # no checkpoint-and-exit for a signal nohup asked to ignore
            assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)


def records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "sig,extra",
    [
        (signal.SIGTERM, []),
        (signal.SIGINT, []),
        (signal.SIGTERM, ["model.lora.r=4"]),
        (signal.SIGTERM, ["method.teacher_storage=offset", "method.optim.moments=bf16"]),
    ],
    ids=["TERM", "INT", "TERM-lora", "TERM-offset-bf16"],
)
def test_a_signalled_run_checkpoints_mid_interval_exits_and_resumes_exactly(
    tmp_path, tiny_model_dir, sig, extra
):
    # save_every=0: no periodic checkpoints, so the one found after the signal is the preemption's
    args = [*SMOKE, "task=[facts]", "method.epochs=100", "method.max_steps=30", "method.save_every=0", *extra]
    run = tmp_path / "r"
    proc = subprocess.Popen(
        [*SDFT, "run", *args, f"run_dir={run}"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # as from a terminal: a shell's background job (how CI may start pytest) inherits INT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or sum("step" in r for r in records(run)) < 3:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "training did not start"
        time.sleep(0.1)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, out
    assert f"{signal.Signals(sig).name}: saving a checkpoint" in out
    assert "Traceback" not in out
    (ckpt,) = (run / "t01_facts" / "train" / "checkpoints").glob("step_*")
    step = int(ckpt.name.split("_")[1])
    assert 3 <= step < 30 and (ckpt / "manifest.json").is_file()
    # a LoRA checkpoint holds the adapters, not the unchanged base weights
    lora = "model.lora.r=4" in extra
    assert (ckpt / "adapter.safetensors").is_file() == lora != (ckpt / "model").is_dir()
    assert [r["step"] for r in records(run) if "step" in r] == list(range(1, step + 1))
    assert not (run / ".lock.owner").exists()  # the run lock went with the process

    again = sdft("run", *args, f"run_dir={run}", cwd=tmp_path)
    assert f"resuming from {ckpt}" in again.stdout
    ref = tmp_path / "ref"
    sdft("run", *args, f"run_dir={ref}", cwd=tmp_path)
    from safetensors.torch import load_file

    a = load_file(str(run / "t01_facts" / "train" / "model" / "model.safetensors"))
    b = load_file(str(ref / "t01_facts" / "train" / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["train/loss"] for r in records(run) if "step" in r]
    assert losses == [r["train/loss"] for r in records(ref) if "step" in r]
