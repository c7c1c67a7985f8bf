"""Divergences, masks and aggregation against brute-force references written with plain loops."""

import math

import pytest
import torch

from sdft_cli.objective import aggregate, entropy, forward_kl, loss_mask, reverse_kl, token_nll


def brute_kl(p_logits, q_logits):
    """KL(P || Q) for one position from the definition, in float64 Python arithmetic."""
    zp = sum(math.exp(x) for x in p_logits)
    zq = sum(math.exp(x) for x in q_logits)
    return sum(
        (math.exp(a) / zp) * (math.log(math.exp(a) / zp) - math.log(math.exp(b) / zq))
        for a, b in zip(p_logits, q_logits, strict=True)
    )


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 7, generator=g) * 2, torch.randn(2, 3, 7, generator=g) * 2


def test_forward_kl_is_kl_teacher_to_student(logits):
    s, t = logits
    got = forward_kl(s, t)
    for b in range(2):
        for i in range(3):
            want = brute_kl(t[b, i].tolist(), s[b, i].tolist())
            assert got[b, i].item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_reverse_kl_is_kl_student_to_teacher(logits):
    s, t = logits
    got = reverse_kl(s, t)
    for b in range(2):
        for i in range(3):
            assert got[b, i].item() == pytest.approx(brute_kl(s[b, i].tolist(), t[b, i].tolist()), rel=1e-5)
    # the two directions differ on these logits, so a swapped implementation would fail above
    assert not torch.allclose(forward_kl(s, t), got)


def test_kl_zero_iff_equal_and_nonnegative(logits):
    s, t = logits
    assert torch.allclose(forward_kl(s, s), torch.zeros(2, 3), atol=1e-6)
    assert (forward_kl(s, t) >= 0).all() and (reverse_kl(s, t) >= 0).all()


def test_forward_kl_gradient_matches_analytic(logits):
    """d KL(T||S) / d student_logits = softmax(S) - softmax(T); no gradient reaches the teacher."""
    s, t = logits
    s = s.clone().requires_grad_(True)
    t = t.clone().requires_grad_(True)
    forward_kl(s, t).sum().backward()
    want = torch.softmax(s.detach(), -1) - torch.softmax(t.detach(), -1)
    assert torch.allclose(s.grad, want, atol=1e-5)
    assert t.grad is None or torch.count_nonzero(t.grad) == 0


def test_reverse_kl_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(1, 1, 5, generator=g, dtype=torch.float64)
    t = torch.randn(1, 1, 5, generator=g, dtype=torch.float64)
    s_req = s.clone().requires_grad_(True)
    reverse_kl(s_req, t).sum().backward()
    eps = 1e-6
    for v in range(5):
        up, down = s.clone(), s.clone()
        up[0, 0, v] += eps
        down[0, 0, v] -= eps
        fd = brute_kl(up[0, 0].tolist(), t[0, 0].tolist()) - brute_kl(down[0, 0].tolist(), t[0, 0].tolist())
        assert s_req.grad[0, 0, v].item() == pytest.approx(fd / (2 * eps), rel=1e-4, abs=1e-6)


def test_nll_and_entropy_brute_force(logits):
    s, _ = logits
    targets = torch.tensor([[0, 3, 6], [1, 1, 2]])
    nll = token_nll(s, targets)
    ent = entropy(s)
    for b in range(2):
        for i in range(3):
            row = s[b, i].tolist()
            z = sum(math.exp(x) for x in row)
            assert nll[b, i].item() == pytest.approx(-(row[targets[b, i]] - math.log(z)), rel=1e-5)
            assert ent[b, i].item() == pytest.approx(
                -sum(math.exp(x) / z * (x - math.log(z)) for x in row), rel=1e-5
            )


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


def test_masked_vocabulary_rows_give_finite_losses():
    """Models that mask unused vocabulary rows with -inf logits: 0 * log 0 counts as 0, not NaN."""
    s = torch.tensor([[[0.0, 1.0, float("-inf")]]], requires_grad=True)
    t = torch.tensor([[[1.0, 0.0, float("-inf")]]])
    for fn in (forward_kl, reverse_kl):
        value = fn(s, t)
        assert torch.isfinite(value).all()
        assert value.item() == pytest.approx(
            brute_kl([1.0, 0.0], [0.0, 1.0]) if fn is forward_kl else brute_kl([0.0, 1.0], [1.0, 0.0]),
            rel=1e-5,
        )
    forward_kl(s, t).sum().backward()
    assert torch.isfinite(s.grad[..., :2]).all()
    assert torch.isfinite(entropy(t)).all()
