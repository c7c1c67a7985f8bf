"""Low-precision AdamW moments (sdft_cli/optim.py): the rounding, 200 steps against exact fp32 AdamW on
the tiny model, and resuming through the checkpoint's optimizer state."""

from __future__ import annotations

import copy

import pytest
import torch

from sdft_cli import distributed, optim
from sdft_cli.config import OptimConfig
from sdft_cli.optim import _round_stochastic
from sdft_cli.schedule import build_optimizer

# The stated tolerances: after 200 steps, |theta - theta_fp32| / |theta_fp32 - theta_0| over all trained
# weights, and the largest gap between the two loss curves relative to the loss.
# Measured at lr 1e-3 (loss 5.57 -> 1.10): drift 0.0071, loss gap 0.0026; a fp32 run from a start
# perturbed by 1e-6 (relative) drifts 8e-5, so the drift is the moments' doing, not chaos.
DRIFT, LOSS_GAP = 0.02, 0.015
# The offset teacher: |phi - phi_fp32| / |phi_fp32 - theta_0| after 200 steps of self-distillation
# (measured 0.00145; the student's drift 0.00182, the loss gap 0.0016, held to DRIFT and LOSS_GAP).
TEACHER_ERR = 0.01


def test_stochastic_rounding_picks_a_neighbour_and_is_unbiased():
    x = torch.tensor([1.0 + 2**-10, -3.14159, 1e-20, 0.0, 7.0]).repeat(20000, 1)
    r = _round_stochastic(x.clone(), 0, 1, 2).float()
    for col in range(x.shape[1]):
        v, exact = r[:, col], float(x[0, col])
        values = sorted(set(v.tolist()))
        assert len(values) <= 2 and values[0] <= exact <= values[-1]  # the bf16 values either side
        if len(values) == 2:  # between them, nothing in bf16
            assert torch.tensor(values[0]).to(torch.bfloat16).float().item() == values[0]
        assert abs(v.double().mean().item() - exact) <= 2e-3 * abs(exact) + 1e-30  # unbiased
    assert torch.equal(r[:, 4], torch.full((20000,), 7.0))  # representable values stay put


def _train(model, moments: str, steps: int, resume_at: int | None = None):
    """``steps`` AdamW steps of next-token NLL on fixed random batches; the loss curve. ``resume_at``: the
    optimizer is rebuilt there from its saved (name-keyed) state, as a resumed checkpoint does."""
    cfg = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=0, schedule="constant", moments=moments)
    opt, sched = build_optimizer(model, cfg, steps)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, 120, (4, 16), generator=g) for _ in range(8)]
    losses = []
    for step in range(steps):
        if step == resume_at:
            state = copy.deepcopy(distributed.optimizer_state(model, opt))
            opt, sched = build_optimizer(model, cfg, steps)
            distributed.load_optimizer_state(model, opt, state)
        ids = batches[step % len(batches)]
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_200_steps_stay_within_the_stated_tolerance_of_exact_adamw(tiny_model):
    moments = "bf16"
    start = copy.deepcopy(tiny_model[0]).train()
    exact, low = copy.deepcopy(start), copy.deepcopy(start)
    ref = _train(exact, "fp32", 200)
    got = _train(low, moments, 200)
    assert ref[-1] < 0.3 * ref[0]  # the run learns, so the drift is measured on a real trajectory
    w0, w_ref, w = _weights(start), _weights(exact), _weights(low)
    drift = float((w - w_ref).norm() / (w_ref - w0).norm())
    gap = max(abs(a - b) / a for a, b in zip(ref, got, strict=True))
    print(f"{moments}: weight drift {drift:.4f}, largest loss gap {gap:.4f}")
    assert drift <= DRIFT and gap <= LOSS_GAP
    assert drift > 1e-3  # not the exact optimizer under another name


def test_resuming_from_the_saved_optimizer_state_continues_exactly(tiny_model):
    moments = "bf16"
    a, b = copy.deepcopy(tiny_model[0]).train(), copy.deepcopy(tiny_model[0]).train()
    assert _train(a, moments, 12) == _train(b, moments, 12, resume_at=5)
    assert torch.equal(_weights(a), _weights(b))


def test_the_moments_are_bf16_and_a_checkpoint_round_trip_keeps_them_so(tiny_model):
    model = copy.deepcopy(tiny_model[0]).train()
    _train(model, "bf16", 3)
    opt, _ = build_optimizer(model, OptimConfig(moments="bf16"), 3)
    ids = torch.randint(5, 120, (2, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    saved = distributed.optimizer_state(model, opt)
    fresh, _ = build_optimizer(model, OptimConfig(moments="bf16"), 3)
    distributed.load_optimizer_state(model, fresh, saved)
    for s in (opt.state, fresh.state):
        assert (
            {v["exp_avg"].dtype for v in s.values()}
            == {v["exp_avg_sq"].dtype for v in s.values()}
            == {torch.bfloat16}
        )


@pytest.mark.parametrize("chunk", [optim.CHUNK, 1000], ids=["whole", "sliced"])
def test_the_per_tensor_adamw_with_fp32_moments_is_torchs_adamw(tiny_model, chunk, monkeypatch):
    """Also when every tensor is updated in slices (``optim.CHUNK``, here smaller than most tensors)."""
    monkeypatch.setattr(optim, "CHUNK", chunk)
    a, b = copy.deepcopy(tiny_model[0]).train(), copy.deepcopy(tiny_model[0]).train()
    cfg = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=0, schedule="constant")
    ours, _ = build_optimizer(a, cfg, 10, per_tensor=True)
    torchs, _ = build_optimizer(b, cfg, 10)
    assert type(ours).__module__ == "sdft_cli.optim" and isinstance(torchs, torch.optim.AdamW)
    ids = torch.randint(5, 120, (4, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        for model, opt in ((a, ours), (b, torchs)):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert torch.allclose(_weights(a), _weights(b), rtol=1e-5, atol=1e-7)


def _distil(model, storage: str, steps: int, alpha: float = 0.05):
    """``steps`` of a self-distillation loss on the tiny model: forward KL from the teacher (given a
    context prefix) to the student (without it), plus NLL so the student keeps moving; the teacher is
    an EMA held as an fp32 copy or as a bf16 offset. Returns the losses and the teacher's weights."""
    from sdft_cli.teacher import make_teacher

    cfg = OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant")
    teacher = make_teacher("ema", model, alpha, storage)
    opt, _ = build_optimizer(model, cfg, steps, per_tensor=storage == "offset")
    teacher.follow(opt)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, 120, (4, 20), generator=g) for _ in range(8)]
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        with torch.no_grad(), teacher.scoring():
            t = teacher.model(ids).logits[:, 4:].log_softmax(-1)
        s = model(ids[:, 4:]).logits.log_softmax(-1)
        loss = (t.exp() * (t - s)).sum(-1).mean() + model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        teacher.update(model)
        losses.append(float(loss.detach()))
    if storage == "offset":
        phi = torch.cat([(p.detach() + teacher.delta[p].float()).flatten() for p in model.parameters()])
    else:
        phi = _weights(teacher.model)
    return losses, phi, teacher


def test_the_offset_teacher_stays_within_the_stated_tolerance_of_the_fp32_ema_over_200_steps(tiny_model):
    start = copy.deepcopy(tiny_model[0]).train()
    exact, offset = copy.deepcopy(start), copy.deepcopy(start)
    ref, phi_ref, _ = _distil(exact, "copy", 200)
    got, phi, teacher = _distil(offset, "offset", 200)
    assert ref[-1] < 0.5 * ref[0]
    w0 = _weights(start)
    teacher_err = float((phi - phi_ref).norm() / (phi_ref - w0).norm())
    drift = float((_weights(offset) - _weights(exact)).norm() / (_weights(exact) - w0).norm())
    gap = max(abs(a - b) / a for a, b in zip(ref, got, strict=True))
    print(f"offset teacher: teacher error {teacher_err:.5f}, student drift {drift:.5f}, loss gap {gap:.5f}")
    assert teacher_err <= TEACHER_ERR and drift <= DRIFT and gap <= LOSS_GAP
    assert all(d.dtype == torch.bfloat16 for d in teacher.delta.values())
    # scoring under the hooks is the model whose weights are theta + delta (brute force)
    plain = copy.deepcopy(offset)
    with torch.no_grad():
        for p, q in zip(offset.parameters(), plain.parameters(), strict=True):
            q.add_(teacher.delta[p].float())
    ids = torch.randint(5, 120, (2, 12))
    with torch.no_grad(), teacher.scoring():
        scored = offset(ids).logits
    assert torch.allclose(scored, plain(ids).logits, atol=1e-5)
    assert not torch.allclose(offset(ids).logits, scored, atol=1e-5)  # the hooks are gone again
    head = teacher.head()
    assert torch.equal(head.weight, plain.lm_head.weight.detach())


def test_the_offset_teacher_follows_a_sliced_update(tiny_model, monkeypatch):
    """Updated slice by slice (``optim.CHUNK`` smaller than most tensors), the offset still tracks the
    fp32 EMA within the stated tolerance."""
    monkeypatch.setattr(optim, "CHUNK", 1000)
    start = copy.deepcopy(tiny_model[0]).train()
    exact, offset = copy.deepcopy(start), copy.deepcopy(start)
    _, phi_ref, _ = _distil(exact, "copy", 20)
    _, phi, _ = _distil(offset, "offset", 20)
    assert float((phi - phi_ref).norm() / (phi_ref - _weights(start)).norm()) <= TEACHER_ERR


def test_the_host_resident_teacher_is_the_fp32_copy(tiny_model):
    """``teacher_storage=cpu`` (on a GPU run the shadow stays in host memory and its forward streams each
    module's weights to the device) computes what the fp32 copy does, step for step; its weights are its
    own, never the student's, and scoring leaves no hook behind. The device transfer itself is checked
    on a GPU (scripts/gpu_check.sh)."""
    start = copy.deepcopy(tiny_model[0]).train()
    a, b = copy.deepcopy(start), copy.deepcopy(start)
    ref, phi_ref, _ = _distil(a, "copy", 20)
    got, phi, teacher = _distil(b, "cpu", 20)
    assert teacher.host and ref == got and torch.equal(phi, phi_ref)
    own = {p.untyped_storage().data_ptr() for p in b.parameters()}
    assert not own & {p.untyped_storage().data_ptr() for p in teacher.model.parameters()}
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in teacher.model.parameters())
    assert not any(m._forward_pre_hooks for m in teacher.model.modules())
    assert torch.equal(teacher.head().weight, teacher.model.lm_head.weight)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_model):
    ids = torch.randint(5, 120, (3, 16), generator=torch.Generator().manual_seed(2))
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_model[0]).train()
        if checkpointing:  # as pipeline.train_stage enables it
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.is_gradient_checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
