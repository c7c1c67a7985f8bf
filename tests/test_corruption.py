"""Corruption: a truncated, altered or missing file, or a manifest that is not valid JSON, is found
against the manifest's sizes and sha256 and reported with its path; a corrupt checkpoint falls back to
an older one (or to the start of the task), a corrupt complete stage is redone, and the result equals
the uninterrupted run.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import SMOKE, sdft, train_context, write_jsonl

from sdft_cli.artifacts import (
    MANIFEST,
    CorruptArtifactError,
    RunLayout,
    is_complete,
    verified,
    verify_manifest,
    write_manifest,
)
from sdft_cli.checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from sdft_cli.config import OptimConfig, TaskConfig
from sdft_cli.methods import METHODS
from sdft_cli.schedule import TrainState, build_optimizer
from sdft_cli.tasks import load_task
from sdft_cli.teacher import Teacher

WORDS = ["apple", "river", "stone", "cloud", "amber", "tiger"]


# ----------------------------------------------------------------------------- file-level damage


def truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def flip(p):
    """Same size, different bytes (bit rot): only the sha256 can tell."""
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


def damage(stage, kind: str):
    """Damage ``stage`` one way; return the path the report must name."""
    if kind == "manifest":
        truncate(stage / MANIFEST)
        return stage / MANIFEST
    target = {
        "truncate": "trainer_state.pt",
        "flip": "model/model.safetensors",
        "delete": "state.json",
    }[kind]
    p = stage / target
    if kind == "delete":
        p.unlink()
    else:
        (truncate if kind == "truncate" else flip)(p)
    return p


def tiny_stage(tmp_path):
    from safetensors.torch import save_file

    stage = tmp_path / "stage"
    (stage / "model").mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(stage / "model" / "model.safetensors"))
    torch.save({"x": torch.ones(3)}, stage / "trainer_state.pt")
    (stage / "state.json").write_text(json.dumps({"step": 1}))
    write_manifest(stage, {"step": 1})
    return stage


@pytest.mark.parametrize("kind", ["truncate", "flip", "delete", "manifest"])
def test_damage_is_found_reported_with_its_path_and_the_stage_marked_incomplete(kind, tmp_path, capsys):
    stage = tiny_stage(tmp_path)
    verify_manifest(stage)
    bad = damage(stage, kind)
    with pytest.raises(CorruptArtifactError, match=str(bad)):
        verify_manifest(stage)
    assert not verified(stage)
    out = capsys.readouterr().out
    assert str(bad) in out and f"{stage} will be redone" in out
    assert not is_complete(stage) and (stage / f".{MANIFEST}.corrupt").is_file()  # kept for inspection


def test_a_manifest_that_is_not_a_mapping_of_files_is_corrupt(tmp_path):
    stage = tiny_stage(tmp_path)
    (stage / MANIFEST).write_text(json.dumps({"files": ["model/model.safetensors"]}))
    with pytest.raises(CorruptArtifactError, match=f"{stage / MANIFEST} is not a valid manifest"):
        verify_manifest(stage)


# ----------------------------------------------------------------------------- checkpoints


class Crash(Exception):
    pass


def make_ctx(model, tok, root):
    cfg = METHODS["sft"].schema(
        prompts_per_step=2, micro_batch_size=2, max_steps=3, save_every=1, loss_chunk_size=5
    )
    cfg.optim = OptimConfig(lr=1e-3, warmup_steps=0)
    return train_context(model, tok, cfg, RunLayout(root))


def train(tiny_model, task, root, crash_at: int | None = None):
    """SFT for 3 steps with a checkpoint after each; ``crash_at``: die in that step's forward."""
    model, tok = tiny_model
    student = copy.deepcopy(model)
    calls = []

    def hook(module, args, kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == crash_at:
                raise Crash

    student.get_decoder().register_forward_pre_hook(hook, with_kwargs=True)
    ctx = make_ctx(student, tok, root)
    if crash_at is None:
        METHODS["sft"].train(ctx, task)
    else:
        with pytest.raises(Crash):
            METHODS["sft"].train(ctx, task)
    return ctx


def steps(root) -> list[tuple[int, float]]:
    lines = (root / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["train/loss"]) for r in map(json.loads, lines) if "step" in r]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The uninterrupted run, and two crashed ones: with checkpoint step 2 only, and with steps 1 and 2
    (a crash between writing a checkpoint and deleting the older one)."""
    tmp = tmp_path_factory.mktemp("corruption")
    rows = [{"prompt": f"Repeat: {w}", "demonstration": w, "answer": w} for w in WORDS]
    write_jsonl(tmp / "task" / "train.jsonl", rows)
    write_jsonl(tmp / "task" / "test.jsonl", rows[:2])
    task = load_task("copy", TaskConfig(source="json", path=str(tmp / "task"), max_new_tokens=4))
    ref = train(tiny_model, task, tmp / "ref").model.state_dict()
    train(tiny_model, task, tmp / "one", crash_at=2)  # checkpoint step 1
    shutil.copytree(tmp / "one", tmp / "two")
    # resumed at step 1: writes step 2, drops step 1, dies in step 3
    train(tiny_model, task, tmp / "two", crash_at=2)
    ckpts = RunLayout(tmp / "two").checkpoints(1, "copy")
    shutil.copytree(RunLayout(tmp / "one").checkpoints(1, "copy") / "step_000001", ckpts / "step_000001")
    return {"task": task, "ref": ref, "ref_steps": steps(tmp / "ref"), "two": tmp / "two"}


def resume_and_compare(tiny_model, runs, root):
    ctx = train(tiny_model, runs["task"], root)
    got = ctx.model.state_dict()
    assert all(torch.equal(got[k], runs["ref"][k]) for k in got)
    assert steps(root) == runs["ref_steps"]  # every step once, the same losses


def test_a_corrupt_checkpoint_falls_back_to_the_older_one(tiny_model, runs, tmp_path, capsys):
    root = tmp_path / "run"
    shutil.copytree(runs["two"], root)
    ckpts = RunLayout(root).checkpoints(1, "copy")
    bad = damage(ckpts / "step_000002", "flip")
    resume_and_compare(tiny_model, runs, root)
    out = capsys.readouterr().out
    assert f"{bad} does not match the sha256" in out
    assert (
        f"falling back to {ckpts / 'step_000001'}" in out and f"resuming from {ckpts / 'step_000001'}" in out
    )


@pytest.mark.parametrize("kind", ["truncate", "flip", "delete", "manifest"])
def test_the_only_checkpoint_corrupt_restarts_the_task_with_the_same_result(
    kind, tiny_model, runs, tmp_path, capsys
):
    root = tmp_path / "run"
    shutil.copytree(runs["two"], root)
    ckpts = RunLayout(root).checkpoints(1, "copy")
    shutil.rmtree(ckpts / "step_000001")
    bad = damage(ckpts / "step_000002", kind)
    resume_and_compare(tiny_model, runs, root)
    out = capsys.readouterr().out
    assert str(bad) in out and "no intact checkpoint: starting the task over" in out
    assert "resuming from" not in out


def checkpoint_at(tiny_model, path, step: int):
    """A real checkpoint of a copy of the tiny model (AdamW state, a live teacher) at ``step`` of 4, and the
    objects it was saved from."""
    model, tok = tiny_model
    student = copy.deepcopy(model)
    opt, sched = build_optimizer(student, OptimConfig(), 4)
    teacher = Teacher("live", student, 1.0)
    return save_checkpoint(
        path, student, tok, teacher=teacher, opt=opt, sched=sched, state=TrainState(step, 4)
    ), (
        student,
        teacher,
        opt,
        sched,
    )


def test_a_new_checkpoint_that_fails_its_check_keeps_the_older_one(tiny_model, tmp_path):
    old, _ = checkpoint_at(tiny_model, tmp_path / "step_000001", 1)
    new, _ = checkpoint_at(tiny_model, tmp_path / "step_000002", 2)
    truncate(new / "trainer_state.pt")
    with pytest.raises(CorruptArtifactError, match=str(new / "trainer_state.pt")):
        prune_checkpoints(tmp_path, keep=new)
    assert verified(old) and not is_complete(new)


def test_trainer_state_is_plain_and_a_pickled_one_is_refused_by_path(tiny_model, tmp_path):
    path, (student, teacher, opt, sched) = checkpoint_at(tiny_model, tmp_path / "step_000001", 1)
    state = torch.load(path / "trainer_state.pt", weights_only=True)  # tensors and plain types only
    assert set(state) == {"optimizer", "scheduler", "rng"}
    # a trainer state holding arbitrary pickled objects (here a numpy array) is not unpickled
    torch.save({**state, "rng": {**state["rng"], "numpy": np.random.get_state()}}, path / "trainer_state.pt")
    with pytest.raises(CorruptArtifactError, match=f"{path}: cannot read its trainer state"):
        load_checkpoint(path, student, teacher, opt, sched)


# ----------------------------------------------------------------------------- complete stages on re-run


@pytest.mark.slow  # two end-to-end runs
def test_corrupt_complete_stages_are_reported_and_redone_on_rerun(tmp_path, tiny_model_dir):
    args = [*SMOKE, "task=[facts]", f"run_dir={tmp_path / 'r'}"]
    sdft("run", *args, cwd=tmp_path)
    run = tmp_path / "r"
    model = run / "t01_facts" / "train" / "model" / "model.safetensors"
    before = {"model": model.read_bytes(), "matrix": json.loads((run / "matrix.json").read_text())["values"]}
    flip(model)  # the trained student: retrained from the base
    truncate(run / "t00_base" / "eval" / MANIFEST)  # row 0's manifest: not JSON any more
    prediction = next((run / "t01_facts" / "eval" / "predictions").iterdir())
    prediction.unlink()  # row 1 lost a file its manifest lists

    out = sdft("run", *args, cwd=tmp_path).stdout
    assert f"{model} does not match the sha256" in out
    assert f"{run / 't00_base' / 'eval' / MANIFEST} is not a valid manifest" in out
    assert f"{prediction} is listed in" in out
    for stage in ("t00_base/eval", "t01_facts/train", "t01_facts/eval"):
        verify_manifest(run / stage)
    assert model.read_bytes() == before["model"]  # retrained: the same weights (CPU, same seeds)
    assert json.loads((run / "matrix.json").read_text())["values"] == before["matrix"]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, lines) if "step" in r] == [1, 2]  # rewound, not doubled
