"""Masks, aggregation weights and importance weights against references written with plain loops."""

import math

import pytest
import torch

from sdft_cli.objective import importance_weights, loss_mask, token_weights


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
