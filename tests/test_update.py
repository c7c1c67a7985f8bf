"""EMA teacher, batch order, schedule and checkpoint round trips."""

import copy
import math

import pytest
import torch

from sdft_cli.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from sdft_cli.config import MethodConfig, OptimConfig
from sdft_cli.schedule import TrainState, batch_indices, build_optimizer, steps_per_task
from sdft_cli.teacher import Teacher


def test_ema_update_matches_the_formula_step_by_step(tiny_model):
    model, _ = tiny_model
    student = copy.deepcopy(model)
    teacher = Teacher("ema", student, alpha=0.1)
    phi = {k: v.clone().double() for k, v in teacher.model.state_dict().items()}
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        teacher.update(student)
        theta = student.state_dict()
        for k in phi:  # phi <- alpha * theta + (1 - alpha) * phi, brute force in float64
            phi[k] = 0.1 * theta[k].double() + 0.9 * phi[k]
    for k, v in teacher.model.state_dict().items():
        assert torch.allclose(v.double(), phi[k], atol=1e-6), k
    # the teacher is a separate fp32 copy that the student's optimizer never touches
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in teacher.model.parameters())


def test_frozen_and_live_teachers(tiny_model):
    model, _ = tiny_model
    student = copy.deepcopy(model)
    frozen = Teacher("frozen", student, alpha=0.5)
    before = copy.deepcopy(frozen.model.state_dict())
    with torch.no_grad():
        next(student.parameters()).add_(1.0)
    frozen.update(student)
    assert all(torch.equal(before[k], v) for k, v in frozen.model.state_dict().items())
    assert Teacher("live", student, 0.5).model is student


def test_batch_indices_cover_each_row_once_per_epoch_and_are_deterministic():
    n, b = 10, 4
    steps = [batch_indices(n, b, s, seed=7) for s in range(5)]  # 20 draws = 2 epochs
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert steps == [batch_indices(n, b, s, seed=7) for s in range(5)]
    assert flat[:10] != flat[10:]  # a fresh permutation per epoch
    assert batch_indices(n, b, 0, seed=8) != steps[0]


def test_steps_per_task():
    cfg = MethodConfig(name="x", epochs=2, prompts_per_step=8, micro_batch_size=4)
    assert steps_per_task(cfg, 36) == 9  # ceil(2 * 36 / 8)
    cfg.max_steps = 5
    assert steps_per_task(cfg, 36) == 5


def test_cosine_schedule_with_warmup(tiny_model):
    model, _ = tiny_model
    opt, sched = build_optimizer(copy.deepcopy(model), OptimConfig(lr=1.0, warmup_steps=2), total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    for s in range(2, 10):  # 0.5 * (1 + cos(pi * progress)) after warmup
        assert lrs[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - 2) / 8)), abs=1e-6)


def test_checkpoint_round_trip_restores_everything(tiny_model, tmp_path):
    model, tok = tiny_model
    student = copy.deepcopy(model)
    teacher = Teacher("ema", student, alpha=0.2)
    opt, sched = build_optimizer(student, OptimConfig(lr=1e-2, warmup_steps=1), total_steps=6)
    ids = torch.randint(0, 200, (2, 6))
    for _ in range(2):
        student(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        teacher.update(student)
    path = save_checkpoint(
        tmp_path / "ck" / "step_000002",
        student,
        tok,
        teacher=teacher,
        opt=opt,
        sched=sched,
        state=TrainState(2, 6),
    )
    assert latest_checkpoint(tmp_path / "ck") == path

    # continue the original for one step, and a restored copy for one step: identical results
    restored = copy.deepcopy(model)
    r_teacher = Teacher("ema", restored, alpha=0.2)
    r_opt, r_sched = build_optimizer(restored, OptimConfig(lr=1e-2, warmup_steps=1), total_steps=6)
    state = load_checkpoint(path, restored, r_teacher, r_opt, r_sched)
    assert (state.step, state.total_steps) == (2, 6)
    for m, o, s, t in ((student, opt, sched, teacher), (restored, r_opt, r_sched, r_teacher)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
        s.step()
        o.zero_grad()
        t.update(m)
    for (k, a), b in zip(student.state_dict().items(), restored.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    for a, b in zip(teacher.model.parameters(), r_teacher.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_incomplete_checkpoint_is_ignored(tmp_path):
    (tmp_path / "step_000004").mkdir()  # no manifest: a checkpoint cut short
    assert latest_checkpoint(tmp_path) is None
