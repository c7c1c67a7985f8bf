"""Independent brute-force checks of ``sdft_cli.divergence`` and ``sdft_cli.chunked``.

Every reference below is written from the definitions with explicit Python loops over the
vocabulary and the tokens, on float64 torch scalars (0-d tensors, so that autograd gives the
reference gradient). None of the package's own helpers (``kl``, ``restrict``, ``rb_coefficients``,
...) is used to build a reference. Sizes are tiny (V = 7, at most 12 tokens) so the file runs in a
few seconds on a shared CPU.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch

from sdft_cli.chunked import LinearHead, distill_terms, fused_loss, nll_terms, rb_coefficients
from sdft_cli.divergence import DivergenceSpec, k3, token_terms

DT = torch.float64
RTOL = 1e-6
ATOL = 1e-10
V = 7
K = 3
NEG_INF = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add wake-up latency on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=""):
    actual = torch.as_tensor(actual, dtype=DT).detach()
    expected = torch.as_tensor(expected, dtype=DT).detach()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, check_dtype=False, msg=msg or None)


# ----------------------------------------------------------------------------------------------
# brute-force references (scalar float64 ops, explicit loops)
# ----------------------------------------------------------------------------------------------


def _zero():
    return torch.zeros((), dtype=DT)


def ref_softmax(row, tau):
    """softmax(row / tau) as a list of 0-d tensors; -inf entries get exactly 0."""
    z = [x / tau for x in row]
    m = max(float(v.detach()) for v in z)
    e = []
    for v in z:
        e.append(_zero() if float(v.detach()) == NEG_INF else torch.exp(v - m))
    total = _zero()
    for x in e:
        total = total + x
    return [x / total for x in e]


def ref_kl(p, q):
    """sum_v p (log p - log q), terms with p = 0 dropped (0 log 0 = 0)."""
    total = _zero()
    for pv, qv in zip(p, q, strict=True):
        if float(pv.detach()) == 0.0:
            continue
        total = total + pv * (torch.log(pv) - torch.log(qv))
    return total


def ref_entropy(p):
    total = _zero()
    for pv in p:
        if float(pv.detach()) > 0.0:
            total = total - pv * torch.log(pv)
    return total


def ref_div(p_s, p_t, name, beta):
    if name == "forward" or (name == "jsd" and beta == 0.0):
        return ref_kl(p_t, p_s)
    if name == "reverse" or (name == "jsd" and beta == 1.0):
        return ref_kl(p_s, p_t)
    assert name == "jsd"
    m = [beta * t + (1.0 - beta) * s for s, t in zip(p_s, p_t, strict=True)]
    return beta * ref_kl(p_t, m) + (1.0 - beta) * ref_kl(p_s, m)


def ref_topk_ids(row, k):
    vals = [float(x.detach()) for x in row]
    order = sorted(range(len(vals)), key=lambda v: vals[v], reverse=True)
    return order[: min(k, len(vals))]


def ref_restrict(p, ids, tail):
    mass = _zero()
    for v in ids:
        mass = mass + p[v]
    if tail == "renorm":
        return [p[v] / mass for v in ids]
    rest = [v for v in range(len(p)) if v not in ids]
    bucket = (1.0 - mass) if rest else _zero()  # all ids chosen: the bucket is empty
    return [p[v] for v in ids] + [bucket]


def ref_token(s_row, t_row, y, spec):
    """Reference per-token dict: loss (with grad), value, logps, entropies."""
    tau = spec.temperature
    p_s = ref_softmax(s_row, tau)
    p_t = ref_softmax(t_row, tau)
    lp_s = torch.log(p_s[y])
    lp_t = torch.log(p_t[y])
    out = {
        "logp_student": lp_s.detach(),
        "logp_teacher": lp_t.detach(),
        "entropy_student": ref_entropy(p_s).detach(),
        "entropy_teacher": ref_entropy(p_t).detach(),
        "lp_s": lp_s,
    }
    if spec.estimator == "sampled":
        d = (lp_s - lp_t).detach()
        out["loss"] = d * lp_s
        out["value"] = d
        return out
    a, b = p_s, p_t
    if spec.support == "topk":
        src = s_row if spec.topk_source == "student" else t_row
        ids = ref_topk_ids(src, spec.topk)
        a, b = ref_restrict(p_s, ids, spec.topk_tail), ref_restrict(p_t, ids, spec.topk_tail)
    loss = ref_div(a, b, spec.divergence, spec.jsd_beta)
    out["loss"] = loss
    out["value"] = loss.detach()
    return out


def rows_of(x):
    """Flatten [..., V] into a list of lists of 0-d tensors (indexing keeps autograd links)."""
    flat = x.reshape(-1, x.shape[-1])
    return [[flat[i, v] for v in range(x.shape[-1])] for i in range(flat.shape[0])]


# ----------------------------------------------------------------------------------------------
# the case matrix
# ----------------------------------------------------------------------------------------------

DIVS = [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]
SUPPORTS = [
    ("full", dict(support="full")),
    ("topk-student-renorm", dict(support="topk", topk=K, topk_source="student", topk_tail="renorm")),
    ("topk-student-bucket", dict(support="topk", topk=K, topk_source="student", topk_tail="bucket")),
    ("topk-teacher-renorm", dict(support="topk", topk=K, topk_source="teacher", topk_tail="renorm")),
    ("topk-teacher-bucket", dict(support="topk", topk=K, topk_source="teacher", topk_tail="bucket")),
]
TEMPS = [1.0, 0.7]


def _finite_with_teacher_zero(div, beta):
    """KL(p_S || p_T) is +inf when p_T has a zero where p_S does not; the others stay finite."""
    return not (div == "reverse" or (div == "jsd" and beta == 1.0))


def _cases():
    cases = []
    for div, beta in DIVS:
        for sup_name, sup in SUPPORTS:
            for tau in TEMPS:
                for neg in (False, True):
                    if neg and not _finite_with_teacher_zero(div, beta):
                        continue
                    spec = DivergenceSpec(divergence=div, jsd_beta=beta, temperature=tau, **sup)
                    tag = "-teacher_neginf" if neg else ""
                    cid = f"{div}{'' if div != 'jsd' else beta}-{sup_name}-T{tau}{tag}"
                    cases.append(pytest.param(spec, neg, id=cid))
    for tau in TEMPS:
        spec = DivergenceSpec(divergence="reverse", estimator="sampled", temperature=tau)
        cases.append(pytest.param(spec, False, id=f"reverse-sampled-T{tau}"))
        spec = DivergenceSpec(divergence="reverse", estimator="rb", temperature=tau)
        cases.append(pytest.param(spec, False, id=f"reverse-rb-analytic-part-T{tau}"))
    return cases


CASES = _cases()


def _make_logits(shape, seed, neg_inf):
    g = torch.Generator().manual_seed(seed)
    s = 1.5 * torch.randn(*shape, V, generator=g, dtype=DT)
    t = 1.5 * torch.randn(*shape, V, generator=g, dtype=DT)
    y = torch.randint(0, V, shape, generator=g)
    w = torch.rand(shape, generator=g, dtype=DT) + 0.2
    if neg_inf:
        # one -inf per token in the teacher, at a random id (sometimes the target itself)
        idx = torch.randint(0, V, shape, generator=g)
        t = t.scatter(-1, idx.unsqueeze(-1), NEG_INF)
    return s, t, y, w


# ----------------------------------------------------------------------------------------------
# 1. token_terms: values, logging fields and gradients
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
# 2. fused_loss vs brute force: value, stats, gradients wrt h and W
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
        term_fn = spec_or_fn if callable(spec_or_fn) else distill_terms(spec_or_fn)
        head = LinearHead(wc) if kind == "linear" else (lambda x, wc=wc: x @ wc.T)
        out = fused_loss(
            hc,
            head,
            [wc],
            teacher if teacher_in is None else teacher_in,
            teacher_head,
            targets,
            weights,
            term_fn,
            chunk,
            seq_ids=seq_ids,
            rb=rb,
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
# 3. Rao-Blackwellised estimator: explicit double loop over tokens
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
            [],
            teacher,
            None,
            targets,
            weights,
            distill_terms(spec),
            chunk,
            seq_ids=RB_SEQ,
            rb=True,
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


# ----------------------------------------------------------------------------------------------
# 4. the sampled estimator is unbiased per token
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
# 5. k3 and the SFT / DFT terms
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
    terms = nll_terms(weighting)(sc, None, y)
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
    _check_fused(nll_terms(weighting), h, w_head, None, targets, weights, (total, None, (h_ref, w_ref)))


# ----------------------------------------------------------------------------------------------
# 6. spec validation
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
        out = fused_loss(hc, head, [wc, bc], t, None, y, wts, distill_terms(DivergenceSpec("reverse")), 4)
        results.append((out.loss, *torch.autograd.grad(out.loss, [hc, wc, bc])))
    for a, c in zip(*results, strict=True):
        assert_close(a, c, msg="linear head path differs from the callable path")


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
