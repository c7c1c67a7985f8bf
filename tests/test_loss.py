"""The chunked loss fused with the output head (``sdft_cli.chunked``) against brute-force float64
references: value, per-token stats and gradients w.r.t. hidden states and head, for every chunk size,
and the Rao-Blackwellised estimator's cross-token term.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
from divergence_refs import (  # noqa: F401  (_one_thread: autouse fixture)
    CASES,
    DT,
    NEG_INF,
    TEMPS,
    K,
    V,
    _one_thread,
    _zero,
    assert_close,
    ref_softmax,
    ref_token,
    rows_of,
)

from sdft_cli.config import DivergenceSpec
from sdft_cli.divergence import TokenLoss, distillation, nll
from sdft_cli.loss import (
    LinearHead,
    fused_loss,
    importance_weights,
    loss_mask,
    rb_coefficients,
    token_weights,
)

# ----------------------------------------------------------------------------------------------
# fused_loss vs brute force: value, stats, gradients wrt h and W
# ----------------------------------------------------------------------------------------------

N_TOK, H_DIM = 6, 4
CHUNKS = (1, 3, 4, 0)  # 4 does not divide N_TOK: a short last chunk


def _fused_data(seed, neg_inf, n=N_TOK):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H_DIM, generator=g, dtype=DT)
    w_head = 0.9 * torch.randn(V, H_DIM, generator=g, dtype=DT)
    teacher = 1.5 * torch.randn(n, V, generator=g, dtype=DT)
    targets = torch.randint(0, V, (n,), generator=g)
    weights = torch.rand(n, generator=g, dtype=DT) + 0.1
    if neg_inf:
        idx = torch.randint(0, V, (n,), generator=g)
        teacher = teacher.scatter(-1, idx.unsqueeze(-1), NEG_INF)
    return h, w_head, teacher, targets, weights


def _ref_total(h_ref, w_ref, teacher, targets, weights, spec, seq_ids=None, rb=False):
    logits = h_ref @ w_ref.T
    s_rows, t_rows = rows_of(logits), rows_of(teacher)
    ys, ws = targets.tolist(), weights.tolist()
    refs = [ref_token(a, b, c, spec) for a, b, c in zip(s_rows, t_rows, ys, strict=True)]
    total = _zero()
    for r, w in zip(refs, ws, strict=True):
        total = total + w * r["loss"]
    if rb:
        seq = [0] * len(ys) if seq_ids is None else seq_ids.tolist()
        for n in range(len(ys)):
            c_n = 0.0
            for t_ in range(n + 1, len(ys)):
                if seq[t_] == seq[n]:
                    c_n += ws[t_] * float(refs[t_]["value"])
            total = total + c_n * refs[n]["lp_s"]
    return total, refs


def _check_fused(
    spec_or_fn,
    h,
    w_head,
    teacher,
    targets,
    weights,
    ref,
    seq_ids=None,
    rb=False,
    teacher_head=None,
    teacher_in=None,
    chunks=CHUNKS,
):
    ref_total, refs, ref_inputs = ref
    grads_ref = torch.autograd.grad(1.7 * ref_total, ref_inputs)
    for chunk, kind in itertools.product(chunks, ("linear", "callable")):
        hc = h.clone().requires_grad_(True)
        wc = w_head.clone().requires_grad_(True)
        objective = spec_or_fn if isinstance(spec_or_fn, TokenLoss) else distillation(spec_or_fn)
        assert objective.rb == rb
        head = LinearHead(wc) if kind == "linear" else (lambda x, wc=wc: x @ wc.T)
        out = fused_loss(
            hc,
            head,
            params=[wc],
            objective=objective,
            targets=targets,
            weights=weights,
            teacher=teacher if teacher_in is None else teacher_in,
            teacher_head=teacher_head,
            seq_ids=seq_ids,
            chunk_size=chunk,
        )
        assert_close(out.loss, ref_total, msg=f"loss differs at chunk_size={chunk}")
        if refs is not None:
            for field in ("value", "logp_student", "logp_teacher", "entropy_student", "entropy_teacher"):
                assert_close(
                    out.stats[field],
                    torch.stack([r[field] for r in refs]),
                    msg=f"stats[{field}] chunk={chunk}",
                )
        gh, gw = torch.autograd.grad(1.7 * out.loss, [hc, wc])
        assert_close(gh, grads_ref[0], msg=f"grad wrt h differs at chunk_size={chunk}")
        assert_close(gw, grads_ref[1], msg=f"grad wrt W differs at chunk_size={chunk}")


def _ref_setup(h, w_head, teacher, targets, weights, spec, seq_ids=None, rb=False):
    h_ref = h.clone().requires_grad_(True)
    w_ref = w_head.clone().requires_grad_(True)
    total, refs = _ref_total(h_ref, w_ref, teacher, targets, weights, spec, seq_ids, rb)
    return total, refs, (h_ref, w_ref)


FUSED_CASES = [c for c in CASES if "rb" not in c.id]


@pytest.mark.parametrize(("spec", "neg_inf"), FUSED_CASES)
def test_fused_loss_vs_brute_force(spec, neg_inf):
    h, w_head, teacher, targets, weights = _fused_data(
        seed=zlib.crc32(str(spec).encode()) % 1000 + 7, neg_inf=neg_inf
    )
    ref = _ref_setup(h, w_head, teacher, targets, weights, spec)
    _check_fused(spec, h, w_head, teacher, targets, weights, ref)


def test_fused_loss_with_teacher_head():
    spec = DivergenceSpec(
        divergence="jsd", jsd_beta=0.3, support="topk", topk=K, topk_tail="bucket", temperature=0.7
    )
    h, w_head, _, targets, weights = _fused_data(seed=3, neg_inf=False)
    g = torch.Generator().manual_seed(4)
    t_hidden = torch.randn(N_TOK, H_DIM, generator=g, dtype=DT)
    w_teacher = torch.randn(V, H_DIM, generator=g, dtype=DT)
    teacher_logits = t_hidden @ w_teacher.T
    ref = _ref_setup(h, w_head, teacher_logits, targets, weights, spec)
    _check_fused(
        spec,
        h,
        w_head,
        teacher_logits,
        targets,
        weights,
        ref,
        teacher_head=lambda x: x @ w_teacher.T,
        teacher_in=t_hidden,
    )


# ----------------------------------------------------------------------------------------------
# Rao-Blackwellised estimator: explicit double loop over tokens
# ----------------------------------------------------------------------------------------------

RB_SEQ = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
RB_CHUNKS = (1, 2, 4, 5, 0, 100)  # 2, 4 and 5 split sequences across chunk boundaries


@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("seq_ids", [RB_SEQ, None], ids=["three-seqs", "one-seq"])
def test_rb_fused_vs_brute_force(tau, seq_ids):
    spec = DivergenceSpec(divergence="reverse", estimator="rb", temperature=tau)
    spec.check()
    n = len(RB_SEQ)
    h, w_head, teacher, targets, weights = _fused_data(seed=17, neg_inf=False, n=n)
    ref = _ref_setup(h, w_head, teacher, targets, weights, spec, seq_ids=seq_ids, rb=True)
    _check_fused(spec, h, w_head, teacher, targets, weights, ref, seq_ids=seq_ids, rb=True, chunks=RB_CHUNKS)


@pytest.mark.parametrize("tau", TEMPS)
def test_rb_value_only(tau):
    """The rb total's value alone (the gradient is checked above)."""
    spec = DivergenceSpec(divergence="reverse", estimator="rb", temperature=tau)
    n = len(RB_SEQ)
    h, w_head, teacher, targets, weights = _fused_data(seed=17, neg_inf=False, n=n)
    total, _, _ = _ref_setup(h, w_head, teacher, targets, weights, spec, seq_ids=RB_SEQ, rb=True)
    for chunk in RB_CHUNKS:
        out = fused_loss(
            h,
            lambda x: x @ w_head.T,
            params=[],
            objective=distillation(spec),
            targets=targets,
            weights=weights,
            teacher=teacher,
            seq_ids=RB_SEQ,
            chunk_size=chunk,
        )
        assert_close(out.loss, total, msg=f"chunk={chunk}")


def test_rb_coefficients_brute_force():
    g = torch.Generator().manual_seed(2)
    seq = torch.tensor([1, 1, 2, 2, 2, 4])
    values = torch.rand(6, generator=g, dtype=DT)
    weights = torch.rand(6, generator=g, dtype=DT)
    carry0 = torch.rand(5, generator=g, dtype=DT)
    carry = carry0.clone()
    c = rb_coefficients(values, weights, seq, carry)
    sl, vl, wl = seq.tolist(), values.tolist(), weights.tolist()
    expected = []
    for i in range(6):
        acc = float(carry0[sl[i]])
        for j in range(i + 1, 6):
            if sl[j] == sl[i]:
                acc += wl[j] * vl[j]
        expected.append(acc)
    assert_close(c, torch.tensor(expected, dtype=DT))
    expected_carry = carry0.clone()
    for i in range(6):
        expected_carry[sl[i]] += wl[i] * vl[i]
    assert_close(carry, expected_carry)


@pytest.mark.parametrize("weighting", ["none", "prob"])
def test_nll_fused_vs_brute_force(weighting):
    h, w_head, _, targets, weights = _fused_data(seed=9, neg_inf=False)
    h_ref = h.clone().requires_grad_(True)
    w_ref = w_head.clone().requires_grad_(True)
    logits = h_ref @ w_ref.T
    total = _zero()
    for row, yy, ww in zip(rows_of(logits), targets.tolist(), weights.tolist(), strict=True):
        p = ref_softmax(row, 1.0)
        lp = torch.log(p[yy])
        total = total + ww * (-lp if weighting == "none" else -p[yy].detach() * lp)
    _check_fused(nll(weighting), h, w_head, None, targets, weights, (total, None, (h_ref, w_ref)))


# ----------------------------------------------------------------------------------------------
# the linear-head fast path (in-place weight gradient) vs the generic callable path
# ----------------------------------------------------------------------------------------------


def test_linear_head_with_softcapping_and_bias_equals_the_callable_path():
    """A LinearHead's in-place weight gradients equal autograd through the same head as a callable."""
    g = torch.Generator().manual_seed(5)
    n, hdim, v = 9, 6, 11
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64)
    w = torch.randn(v, hdim, generator=g, dtype=torch.float64)
    b = torch.randn(v, generator=g, dtype=torch.float64)
    t = torch.randn(n, v, generator=g, dtype=torch.float64)
    y = torch.randint(0, v, (n,), generator=g)
    wts = torch.rand(n, generator=g, dtype=torch.float64)

    def cap(z):
        return torch.tanh(z / 3.0) * 3.0

    results = []
    for kind in ("linear", "callable"):
        hc, wc, bc = (x.clone().requires_grad_(True) for x in (h, w, b))
        head = LinearHead(wc, bc, cap) if kind == "linear" else (lambda x, wc=wc, bc=bc: cap(x @ wc.T + bc))
        out = fused_loss(
            hc,
            head,
            params=[wc, bc],
            objective=distillation(DivergenceSpec("reverse")),
            targets=y,
            weights=wts,
            teacher=t,
            chunk_size=4,
        )
        results.append((out.loss, *torch.autograd.grad(out.loss, [hc, wc, bc])))
    for a, c in zip(*results, strict=True):
        assert_close(a, c, msg="linear head path differs from the callable path")


# ----------------------------------------------------------------------------------------------
# which tokens carry loss, and with what weight
# ----------------------------------------------------------------------------------------------


def aggregate(per, mask, mode, normalizer):
    """The step-loss share of a micro-batch, as the training loops form it."""
    return (per * token_weights(mask, mode, normalizer)).sum()


def test_loss_mask_skips_first_tokens_and_keeps_padding_out():
    cmask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]])
    m = loss_mask(cmask, 3)
    assert m.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0]]
    assert loss_mask(cmask, 0).tolist() == cmask.float().tolist()


def test_seq_mean_is_token_mean_per_sequence_then_batch_mean():
    per = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # (1.5 + 30 + 0) / 3 sequences: the empty sequence counts as a sequence with zero loss
    assert aggregate(per, mask, "seq_mean", 3.0).item() == pytest.approx((1.5 + 30.0 + 0.0) / 3)
    # (1 + 2 + 20 + 30 + 40) / 5 tokens
    assert aggregate(per, mask, "token_mean", 5.0).item() == pytest.approx(93.0 / 5)


def test_micro_batches_add_up_to_the_full_batch_loss():
    g = torch.Generator().manual_seed(3)
    per = torch.rand(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).float()
    for mode, norm in (("seq_mean", 6.0), ("token_mean", float(mask.sum()))):
        full = aggregate(per, mask, mode, norm)
        parts = sum(aggregate(per[i : i + 2], mask[i : i + 2], mode, norm) for i in range(0, 6, 2))
        assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_token_weights_seq_mean_by_loop():
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    w = token_weights(mask, "seq_mean", 4.0)  # 4 sequences in the step, 2 in this micro-batch
    for b in range(2):
        n = sum(mask[b].tolist())
        for t in range(4):
            assert w[b, t].item() == pytest.approx(mask[b, t].item() / n / 4.0)


def test_importance_weights_are_capped_sequence_means():
    lp_train = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    lp_samp = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    w = importance_weights(lp_train, lp_samp, mask, cap=2.0)
    want0 = (min(math.exp(0.5), 2.0) + min(math.exp(-1.0), 2.0) + min(math.exp(2.5), 2.0)) / 3
    assert w.tolist() == pytest.approx([want0, 1.0, 1.0])


def test_the_teacher_logits_formed_in_the_loss_are_timed_as_teacher_work():
    """The fused loss reports the time spent on the teacher's head, which the training loop moves from
    the update timer to the scoring timer (``Timer.move``)."""
    from sdft_cli.logger import Timer

    g = torch.Generator().manual_seed(3)
    h, h_t = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    w, w_t = torch.randn(500, 16, generator=g), torch.randn(500, 16, generator=g)
    y, wts = torch.randint(0, 500, (64,), generator=g), torch.full((64,), 1 / 64)
    common = dict(params=[], targets=y, weights=wts, teacher=h_t, teacher_head=LinearHead(w_t))
    objective = distillation(DivergenceSpec())
    for chunk in (8, 0):  # chunked and naive
        out = fused_loss(h, LinearHead(w), objective=objective, chunk_size=chunk, **common)
        assert out.teacher_seconds > 0

    timer = Timer()
    timer.totals.update(update=2.0, score=0.5)
    timer.move(0.75, "update", "score")
    assert timer.pop() == {"time/update": 1.25, "time/score": 1.25}


def test_fused_loss_under_bf16_autocast_accumulates_the_head_gradient_over_chunks_in_fp32():
    """Under bf16 autocast (the default on CPUs with native bf16 and on GPUs) a micro-batch of more tokens
    than one chunk adds each chunk's head-weight gradient into an fp32 accumulator; the result agrees
    with one chunk and, to bf16 precision, with fp32 computation."""
    g = torch.Generator().manual_seed(0)
    n, hid, vocab = 40, 16, 50
    h = torch.randn(n, hid, generator=g)
    w = 0.5 * torch.randn(vocab, hid, generator=g)
    t_hidden = torch.randn(n, hid, generator=g)
    w_t = 0.5 * torch.randn(vocab, hid, generator=g)
    targets = torch.randint(0, vocab, (n,), generator=g)
    weights = torch.full((n,), 1.0 / n)
    objective = distillation(DivergenceSpec())

    def grads(chunk: int, amp: bool):
        hc, wc = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = fused_loss(
                hc,
                LinearHead(wc),
                params=[wc],
                objective=objective,
                targets=targets,
                weights=weights,
                teacher=t_hidden,
                teacher_head=LinearHead(w_t),
                seq_ids=torch.zeros(n, dtype=torch.long),
                chunk_size=chunk,
            )
        out.loss.backward()
        return hc.grad, wc.grad

    exact = grads(0, amp=False)
    one = grads(0, amp=True)
    chunked = grads(7, amp=True)  # 6 chunks, the last one short
    assert chunked[1].dtype == torch.float32
    for got, ref in zip(chunked, one, strict=True):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-3)
    for got, ref in zip(chunked, exact, strict=True):
        torch.testing.assert_close(got, ref, rtol=5e-2, atol=5e-3)
