"""Per-token distillation terms (``sdft_cli.divergence``) against brute-force float64 references.

References live in ``divergence_refs.py``: explicit loops over the vocabulary on float64 scalars,
none of the package's helpers. Sizes are tiny so the file runs in seconds on a shared CPU.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from divergence_refs import (  # noqa: F401  (_one_thread: autouse fixture)
    CASES,
    DT,
    SUPPORTS,
    TEMPS,
    V,
    _make_logits,
    _one_thread,
    _zero,
    assert_close,
    ref_kl,
    ref_softmax,
    ref_token,
    rows_of,
)

from sdft_cli.config import DivergenceSpec
from sdft_cli.divergence import k3, nll, token_terms

# ----------------------------------------------------------------------------------------------
# token_terms: values, logging fields and gradients
# ----------------------------------------------------------------------------------------------


def _check_token_terms(spec, s, t, y, g):
    spec.check()
    s_code = s.clone().requires_grad_(True)
    terms = token_terms(s_code, t, y, spec)
    loss_code = (g * terms.loss).sum()
    (grad_code,) = torch.autograd.grad(loss_code, s_code)

    s_ref = s.clone().requires_grad_(True)
    s_rows, t_rows = rows_of(s_ref), rows_of(t)
    ys, gs = y.reshape(-1).tolist(), g.reshape(-1).tolist()
    refs = [ref_token(sr, tr, yy, spec) for sr, tr, yy in zip(s_rows, t_rows, ys, strict=True)]
    loss_ref = _zero()
    for r, gg in zip(refs, gs, strict=True):
        loss_ref = loss_ref + gg * r["loss"]
    (grad_ref,) = torch.autograd.grad(loss_ref, s_ref)

    shape = y.shape
    for field in ("value", "logp_student", "logp_teacher", "entropy_student", "entropy_teacher"):
        expected = torch.stack([r[field] for r in refs]).reshape(shape)
        assert_close(getattr(terms, field), expected, msg=f"{field} differs")
    assert_close(
        terms.loss, torch.stack([r["loss"].detach() for r in refs]).reshape(shape), msg="loss differs"
    )
    assert torch.isfinite(terms.value).all()
    assert torch.isfinite(grad_code).all(), "non-finite gradient"
    assert_close(grad_code, grad_ref, msg="gradient differs")
    return terms


@pytest.mark.parametrize(("spec", "neg_inf"), CASES)
def test_token_terms_vs_brute_force(spec, neg_inf):
    s, t, y, g = _make_logits((3, 4), seed=zlib.crc32(str(spec).encode()) % 1000 + 1, neg_inf=neg_inf)
    _check_token_terms(spec, s, t, y, g)


EDGE_K = []
for _k in (1, V, 100):
    for _src in ("student", "teacher"):
        for _tail in ("renorm", "bucket"):
            for _div, _beta in (("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)):
                EDGE_K.append(
                    pytest.param(
                        DivergenceSpec(
                            divergence=_div,
                            jsd_beta=_beta,
                            support="topk",
                            topk=_k,
                            topk_source=_src,
                            topk_tail=_tail,
                        ),
                        id=f"{_div}-k{_k}-{_src}-{_tail}",
                    )
                )


@pytest.mark.parametrize("spec", EDGE_K)
def test_token_terms_topk_edge_sizes(spec):
    """k = 1 (point masses / a 2-point distribution) and k >= V (the whole vocabulary, empty bucket)."""
    s, t, y, g = _make_logits((2, 2), seed=11 + spec.topk, neg_inf=False)
    terms = _check_token_terms(spec, s, t, y, g)
    if spec.topk >= V:
        # the support is the whole vocabulary: the same numbers as support=full
        full = DivergenceSpec(divergence=spec.divergence, jsd_beta=spec.jsd_beta)
        assert_close(terms.value, token_terms(s, t, y, full).value)
    if spec.topk == 1 and spec.topk_tail == "renorm":
        assert_close(terms.value, torch.zeros_like(terms.value))


def test_token_terms_float32_input_matches_float64_reference():
    spec = DivergenceSpec(divergence="jsd", jsd_beta=0.3, temperature=0.7)
    s, t, y, _ = _make_logits((3, 4), seed=5, neg_inf=False)
    terms = token_terms(s.float(), t.float(), y, spec)
    assert terms.value.dtype == torch.float32
    refs = [
        ref_token(sr, tr, yy, spec)["value"]
        for sr, tr, yy in zip(rows_of(s), rows_of(t), y.reshape(-1).tolist(), strict=True)
    ]
    assert_close(terms.value, torch.stack(refs).reshape(3, 4), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# JSD continuity at its end points
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sup", [s for _, s in SUPPORTS], ids=[n for n, _ in SUPPORTS])
@pytest.mark.parametrize("tau", TEMPS)
def test_jsd_limits(sup, tau):
    s, t, y, _ = _make_logits((3, 4), seed=21, neg_inf=False)
    fwd_spec = DivergenceSpec(divergence="forward", temperature=tau, **sup)
    rev_spec = DivergenceSpec(divergence="reverse", temperature=tau, **sup)
    s_rows, t_rows, ys = rows_of(s), rows_of(t), y.reshape(-1).tolist()
    fwd = torch.stack(
        [ref_token(a, b, c, fwd_spec)["value"] for a, b, c in zip(s_rows, t_rows, ys, strict=True)]
    ).reshape(3, 4)
    rev = torch.stack(
        [ref_token(a, b, c, rev_spec)["value"] for a, b, c in zip(s_rows, t_rows, ys, strict=True)]
    ).reshape(3, 4)

    eps = 1e-5
    lo = token_terms(s, t, y, DivergenceSpec(divergence="jsd", jsd_beta=eps, temperature=tau, **sup)).value
    hi = token_terms(
        s, t, y, DivergenceSpec(divergence="jsd", jsd_beta=1.0 - eps, temperature=tau, **sup)
    ).value
    assert_close(lo / eps, fwd, rtol=1e-3, atol=1e-8)
    assert_close(hi / eps, rev, rtol=1e-3, atol=1e-8)
    # and the end points themselves are the KLs exactly
    assert_close(
        token_terms(s, t, y, DivergenceSpec(divergence="jsd", jsd_beta=0.0, temperature=tau, **sup)).value,
        fwd,
    )
    assert_close(
        token_terms(s, t, y, DivergenceSpec(divergence="jsd", jsd_beta=1.0, temperature=tau, **sup)).value,
        rev,
    )


# ----------------------------------------------------------------------------------------------
# the sampled estimator is unbiased per token
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", TEMPS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_estimator_unbiased(tau, seed):
    spec = DivergenceSpec(divergence="reverse", estimator="sampled", temperature=tau)
    spec.check()
    g = torch.Generator().manual_seed(100 + seed)
    s = 1.5 * torch.randn(1, V, generator=g, dtype=DT)
    t = 1.5 * torch.randn(1, V, generator=g, dtype=DT)

    s_ref = s.clone().requires_grad_(True)
    p_s = ref_softmax([s_ref[0, v] for v in range(V)], tau)
    p_t = ref_softmax([t[0, v] for v in range(V)], tau)
    kl_ref = ref_kl(p_s, p_t)
    (grad_kl,) = torch.autograd.grad(kl_ref, s_ref)
    probs = [float(p.detach()) for p in p_s]

    expected_grad = torch.zeros_like(s)
    expected_value = 0.0
    for y in range(V):
        sc = s.clone().requires_grad_(True)
        terms = token_terms(sc, t, torch.tensor([y]), spec)
        (gy,) = torch.autograd.grad(terms.loss.sum(), sc)
        expected_grad += probs[y] * gy
        expected_value += probs[y] * float(terms.value)
    assert_close(expected_grad, grad_kl)
    assert_close(expected_value, kl_ref)
    assert float(grad_kl.abs().max()) > 1e-3  # not a trivially-zero comparison


# ----------------------------------------------------------------------------------------------
# k3 and the SFT / DFT terms
# ----------------------------------------------------------------------------------------------


def test_k3_brute_force():
    pairs = [(-1.0, -1.0), (-0.3, -2.5), (-4.0, -0.1), (-10.0, -0.5), (-1e-3, -20.0), (-2.0, -2.0 + 1e-7)]
    ls = torch.tensor([a for a, _ in pairs], dtype=DT)
    lt = torch.tensor([b for _, b in pairs], dtype=DT)
    expected = [(a - b) + math.exp(b - a) - 1.0 for a, b in pairs]
    assert_close(k3(ls, lt), torch.tensor(expected, dtype=DT), atol=1e-12)
    assert float(k3(ls, lt).min()) >= 0.0


@pytest.mark.parametrize("weighting", ["none", "prob"])
def test_nll_terms_brute_force(weighting):
    s, _, y, g = _make_logits((3, 4), seed=8, neg_inf=False)
    sc = s.clone().requires_grad_(True)
    terms = nll(weighting).terms(sc, None, y)
    (grad_code,) = torch.autograd.grad((g * terms.loss).sum(), sc)

    s_ref = s.clone().requires_grad_(True)
    total = _zero()
    losses = []
    for row, yy, gg in zip(rows_of(s_ref), y.reshape(-1).tolist(), g.reshape(-1).tolist(), strict=True):
        p = ref_softmax(row, 1.0)
        lp = torch.log(p[yy])
        loss = -lp if weighting == "none" else -p[yy].detach() * lp
        losses.append(loss.detach())
        total = total + gg * loss
    (grad_ref,) = torch.autograd.grad(total, s_ref)
    assert_close(terms.loss, torch.stack(losses).reshape(3, 4))
    assert_close(grad_code, grad_ref)


# ----------------------------------------------------------------------------------------------
# spec validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(divergence="tv"),
        dict(support="nucleus"),
        dict(estimator="k3"),
        dict(divergence="jsd", jsd_beta=-0.1),
        dict(divergence="jsd", jsd_beta=1.5),
        dict(support="topk", topk=0),
        dict(support="topk", topk_source="both"),
        dict(support="topk", topk_tail="drop"),
        dict(temperature=0.0),
        dict(temperature=-1.0),
        dict(divergence="forward", estimator="sampled"),
        dict(divergence="jsd", estimator="sampled"),
        dict(divergence="forward", estimator="rb"),
        dict(divergence="jsd", jsd_beta=1.0, estimator="rb"),
        dict(divergence="reverse", estimator="sampled", support="topk"),
    ],
)
def test_spec_check_rejects(kwargs):
    with pytest.raises(ValueError):
        DivergenceSpec(**kwargs).check()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(divergence="reverse", estimator="sampled"),
        dict(divergence="reverse", estimator="rb"),
        dict(divergence="reverse", estimator="rb", support="topk", topk=5),
        dict(divergence="jsd", jsd_beta=0.0),
        dict(divergence="jsd", jsd_beta=1.0, support="topk", topk_tail="bucket", topk_source="student"),
        dict(temperature=0.5),
    ],
)
def test_spec_check_accepts(kwargs):
    DivergenceSpec(**kwargs).check()


@pytest.mark.parametrize("div,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.3)])
def test_vocabulary_rows_masked_in_both_models_drop_out_with_finite_gradients(div, beta):
    """Rows at -inf in student and teacher (a masked vocabulary) behave as if absent: same value and
    gradient as the reduced vocabulary, zero (not NaN) gradient on the masked row."""
    g = torch.Generator().manual_seed(11)
    s = torch.randn(4, 7, generator=g, dtype=torch.float64)
    t = torch.randn(4, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (4,), generator=g)
    spec = DivergenceSpec(divergence=div, jsd_beta=beta)
    full_s = torch.cat([s, torch.full((4, 1), float("-inf"), dtype=torch.float64)], -1).requires_grad_(True)
    full_t = torch.cat([t, torch.full((4, 1), float("-inf"), dtype=torch.float64)], -1)
    red_s = s.clone().requires_grad_(True)
    got = token_terms(full_s, full_t, y, spec).loss
    want = token_terms(red_s, t, y, spec).loss
    assert_close(got, want, msg="masked row changes the value")
    (g_full,) = torch.autograd.grad(got.sum(), [full_s])
    (g_red,) = torch.autograd.grad(want.sum(), [red_s])
    assert torch.isfinite(g_full).all()
    assert_close(g_full[:, :7], g_red, msg="masked row changes the gradient")
    assert (g_full[:, 7] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", [False, True], ids=["finite", "neg-inf"])
def test_closed_form_forward_kl_equals_autograd_of_the_token_terms(temperature, masked):
    from sdft_cli.divergence import forward_kl_terms_and_grad

    g = torch.Generator().manual_seed(11)
    s = torch.randn(7, 40, generator=g, dtype=torch.float64) * 3
    t = torch.randn(7, 40, generator=g, dtype=torch.float64) * 3
    if masked:  # a vocabulary both models exclude, and tokens only the student excludes
        s[:, :5] = t[:, :5] = float("-inf")
        s[2, 10] = float("-inf")
        t[2, 10] = -50.0
    y = torch.randint(12, 40, (7,), generator=g)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    spec = DivergenceSpec(divergence="forward", temperature=temperature)
    s_ref = s.clone().requires_grad_(True)
    ref = token_terms(s_ref, t, y, spec)
    (grad_ref,) = torch.autograd.grad((w * ref.loss).sum(), [s_ref])
    terms, grad = forward_kl_terms_and_grad(s, t, y, w, temperature)
    for field in ("value", "logp_student", "logp_teacher", "entropy_student", "entropy_teacher"):
        assert torch.allclose(getattr(terms, field), getattr(ref, field).detach(), atol=1e-10), field
    finite = torch.isfinite(grad_ref)
    assert torch.allclose(grad[finite], grad_ref[finite], atol=1e-12)
