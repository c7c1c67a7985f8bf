"""Brute-force references shared by test_divergence.py and test_chunked.py.

Every reference is written from the definitions with explicit Python loops over the vocabulary and
the tokens, on float64 torch scalars (0-d tensors, so that autograd gives the reference gradient).
None of the package's own helpers (``kl``, ``restrict``, ``rb_coefficients``, ...) is used.
"""

from __future__ import annotations

import pytest
import torch

from sdft_cli.divergence import DivergenceSpec

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
