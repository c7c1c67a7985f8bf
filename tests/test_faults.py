"""Numerical faults: a NaN/inf loss or gradient is caught at its step, which either stops the run with
an error naming the task, step and rows (no checkpoint or model written after it) or is skipped and
counted; a state holding NaN/inf is never saved.

Faults are injected with a test-side forward hook on the student's embedding that fires only on the
training forward (grad enabled) of a prompt carrying a marker character, so the poisoned row is a real
dataset row and the step it lands in follows from ``batch_indices``.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import train_context, write_jsonl

from sdft_cli.artifacts import RunLayout, is_complete, read_manifest, verify_manifest
from sdft_cli.checkpoint import save_checkpoint, save_final
from sdft_cli.config import OptimConfig, TaskConfig
from sdft_cli.errors import ConfigError
from sdft_cli.guard import NonFiniteError
from sdft_cli.methods import METHODS
from sdft_cli.methods.context import TrainContext
from sdft_cli.schedule import TrainState, batch_indices, build_optimizer
from sdft_cli.tasks import load_task
from sdft_cli.teacher import Teacher

MARK = "#"
WORDS = ["apple", "river", "stone", "cloud", "amber", "tiger"]
PER_STEP, STEPS, SEED, STAGE = 2, 3, 0, 1


def poisoned_row(step: int) -> int:
    """The first row of the batch of (1-based) ``step``: every row appears once in the 3 steps."""
    return batch_indices(len(WORDS), PER_STEP, step - 1, (SEED, STAGE))[0]


def make_task(tmp_path, rows: tuple[int, ...] = ()):
    data = [
        {"prompt": f"Repeat: {MARK if i in rows else ''}{w}", "demonstration": w, "answer": w}
        for i, w in enumerate(WORDS)
    ]
    write_jsonl(tmp_path / "task" / "train.jsonl", data)
    write_jsonl(tmp_path / "task" / "test.jsonl", data[:2])
    return load_task("copy", TaskConfig(source="json", path=str(tmp_path / "task"), max_new_tokens=4))


def make_cfg(method: str = "sft", micro: int = PER_STEP, **optim):
    cfg = METHODS[method].schema(
        prompts_per_step=PER_STEP, micro_batch_size=micro, max_steps=STEPS, save_every=1, loss_chunk_size=5
    )
    cfg.optim = OptimConfig(lr=1e-3, warmup_steps=0, **optim)
    return cfg


def make_ctx(student, tok, cfg, tmp_path) -> TrainContext:
    return train_context(student, tok, cfg, RunLayout(tmp_path / "run"), seed=SEED, stage=STAGE)


def inject(student, tok, kind: str, always: bool = False) -> None:
    """Make the training forward of a marked prompt (or of every prompt) non-finite: ``loss`` turns the
    embeddings into NaN, ``grad`` leaves the loss finite and turns their gradient into inf."""
    mark = tok(MARK, add_special_tokens=False).input_ids[0]

    def hook(module, args, out):
        if not torch.is_grad_enabled() or not (always or bool((args[0] == mark).any())):
            return out
        if kind == "loss":
            return out * float("nan")
        out.register_hook(lambda g: g * float("inf"))
        return out

    student.get_input_embeddings().register_forward_hook(hook)


def records(ctx) -> list[dict]:
    return [json.loads(line) for line in ctx.logger.path.read_text().splitlines()]


def finite(state: dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


@pytest.mark.parametrize("method", ["sft", "sdft"])
def test_stop_names_the_step_and_rows_and_writes_nothing_after_the_fault(method, tiny_model, tmp_path):
    model, tok = tiny_model
    student = copy.deepcopy(model)
    bad = poisoned_row(3)
    inject(student, tok, "loss")
    ctx = make_ctx(student, tok, make_cfg(method, micro=1), tmp_path)
    with pytest.raises(NonFiniteError) as err:
        METHODS[method].train(ctx, make_task(tmp_path, rows=(bad,)))
    msg = str(err.value)
    assert "stage 1 (task copy): step 3 " in msg and f"rows [{bad}]" in msg and "on_nonfinite=stop" in msg

    # the last good checkpoint (step 2) is intact and finite; nothing after the fault was written
    train = ctx.train_dir
    assert [p.name for p in (train / "checkpoints").iterdir()] == ["step_000002"]
    verify_manifest(train / "checkpoints" / "step_000002")
    from safetensors.torch import load_file

    assert finite(load_file(str(train / "checkpoints" / "step_000002" / "model" / "model.safetensors")))
    assert not (train / "model").exists() and not is_complete(train)
    logged = records(ctx)
    assert [r["step"] for r in logged if "step" in r] == [1, 2]
    (event,) = [r for r in logged if r.get("event") == "nonfinite"]
    assert (event["at_step"], event["rows"], event["action"]) == (3, [bad], "stop")


def test_resuming_after_a_stop_equals_an_uninterrupted_run(tiny_model, tmp_path):
    model, tok = tiny_model
    bad = poisoned_row(2)
    faulty = copy.deepcopy(model)
    inject(faulty, tok, "grad")  # a finite loss with an inf gradient is caught too
    ctx = make_ctx(faulty, tok, make_cfg(), tmp_path)
    task = make_task(tmp_path, rows=(bad,))
    with pytest.raises(NonFiniteError, match=r"step 2 .* rows \["):
        METHODS["sft"].train(ctx, task)

    # the fault removed (the hook is gone), the same command resumes from the step-1 checkpoint
    resumed = make_ctx(copy.deepcopy(model), tok, make_cfg(), tmp_path)
    METHODS["sft"].train(resumed, task)
    ref = make_ctx(copy.deepcopy(model), tok, make_cfg(), tmp_path / "ref")
    METHODS["sft"].train(ref, task)
    a, b = resumed.model.state_dict(), ref.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["train/loss"] for r in records(resumed) if "step" in r]
    assert losses == [r["train/loss"] for r in records(ref) if "step" in r]


@pytest.mark.parametrize(("method", "kind"), [("sft", "grad"), ("sft", "loss"), ("sdft", "loss")])
def test_skip_leaves_the_weights_unchanged_counts_and_finishes(method, kind, tiny_model, tmp_path):
    model, tok = tiny_model
    student = copy.deepcopy(model)
    bad = poisoned_row(2)
    inject(student, tok, kind)
    before: list[dict] = []  # the weights at the start of each training forward (one per step)

    def snapshot(module, args, kwargs):
        if torch.is_grad_enabled():
            before.append({k: v.detach().clone() for k, v in student.state_dict().items()})

    student.get_decoder().register_forward_pre_hook(snapshot, with_kwargs=True)
    ctx = make_ctx(student, tok, make_cfg(method, on_nonfinite="skip"), tmp_path)
    METHODS[method].train(ctx, make_task(tmp_path, rows=(bad,)))

    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    after = student.state_dict()
    assert len(before) == STEPS
    assert not same(before[0], before[1]) and not same(before[2], after)  # steps 1 and 3 updated
    assert same(before[1], before[2])  # step 2 was skipped: no update at all
    assert finite(after) and is_complete(ctx.train_dir)
    assert read_manifest(ctx.train_dir)["skipped_steps"] == [2]
    logged = records(ctx)
    assert [r["train/skipped_steps"] for r in logged if "step" in r] == [0, 1, 1]
    (event,) = [r for r in logged if r.get("event") == "nonfinite"]
    assert (event["at_step"], event["action"]) == (2, "skip") and bad in event["rows"]


def test_consecutive_skips_are_capped(tiny_model, tmp_path):
    model, tok = tiny_model
    student = copy.deepcopy(model)
    inject(student, tok, "loss", always=True)
    ctx = make_ctx(student, tok, make_cfg(on_nonfinite="skip", max_nonfinite_skips=2), tmp_path)
    with pytest.raises(NonFiniteError, match=r"step 3 .*after 2 consecutive skipped steps"):
        METHODS["sft"].train(ctx, make_task(tmp_path))
    # the checkpoints of the skipped steps hold the untouched (finite) weights
    ckpt = ctx.train_dir / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "state.json").read_text())["skipped"] == [1, 2]
    assert not (ctx.train_dir / "model").exists()


def test_a_nonfinite_state_is_never_saved(tiny_model, tmp_path):
    model, tok = tiny_model
    student = copy.deepcopy(model)
    teacher = Teacher("ema", student, 0.1)
    opt, sched = build_optimizer(student, OptimConfig(), 4)
    name, param = next(iter(student.named_parameters()))
    with torch.no_grad():
        param[0, 0] = float("inf")
    path = tmp_path / "ck" / "step_000001"
    with pytest.raises(NonFiniteError, match=rf"not writing {path}: student: {name}"):
        save_checkpoint(path, student, tok, teacher=teacher, opt=opt, sched=sched, state=TrainState(1, 4))
    assert not path.exists()
    with pytest.raises(NonFiniteError, match="student"):
        save_final(tmp_path / "train", student, tok, {})
    assert not (tmp_path / "train").exists()


def test_on_nonfinite_is_checked():
    with pytest.raises(ConfigError, match="method.optim.on_nonfinite"):
        OptimConfig(on_nonfinite="ignore")
    with pytest.raises(ConfigError, match="method.optim.max_nonfinite_skips"):
        OptimConfig(max_nonfinite_skips=0)


@pytest.mark.slow  # torchrun: two processes
def test_two_processes_agree_to_stop_at_a_nonfinite_step(tmp_path, tiny_model):
    # a model whose final norm is NaN: every training loss is NaN from step 1 on, on both ranks
    model, tok = tiny_model
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.get_decoder().norm.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan_model")
    tok.save_pretrained(tmp_path / "nan_model")
    run = tmp_path / "r"
    args = ["model=hf", f"model.path={tmp_path / 'nan_model'}", "model.name=nan", "logger.progress=false"]
    args += ["task=[facts]", "method.max_steps=2", "method.prompts_per_step=4", "method.micro_batch_size=1"]
    args += ["method.save_every=1", "rollout.temperature=0", "rollout.max_new_tokens=4", "eval.max_items=2"]
    args += [f"run_dir={run}"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run(
        [*torchrun, "-m", "sdft_cli", "run", *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    errors = [
        line for line in text.splitlines() if line.startswith("sdft: error: stage 1 (task facts): step 1")
    ]
    assert len(errors) == 2, text  # each rank stopped on its own, at the same step (no hang, no timeout)
    train = run / "t01_facts" / "train"
    assert not (train / "model").exists() and not is_complete(train)
    assert not list(train.glob("checkpoints/step_*"))
