"""Tests for sdft_cli.metrics: the docs/metrics.md §6 worked example, a loop-based reference, NaN cases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from sdft_cli import metrics as M

# docs/metrics.md §6: T = 3 trained tasks, one prior benchmark G.
W = np.array(
    [
        [0.30, 0.40, 0.20, 0.65],
        [0.80, 0.45, 0.25, 0.60],
        [0.82, 0.85, 0.30, 0.58],
        [0.60, 0.75, 0.90, 0.55],
    ]
)
W_NORMALIZED = np.array(
    [
        [0.0000, 0.0000, 0.0000],
        [0.9615, 0.1111, 0.0714],
        [1.0000, 1.0000, 0.1429],
        [0.5769, 0.7778, 1.0000],
    ]
)
NAN = float("nan")


def same(a: float, b: float, tol: float = 1e-9) -> bool:
    """Equal within tol, with NaN equal only to NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol


# ----------------------------------------------------------------------------- worked example


# the metrics of the worked example (docs/metrics.md §6 table)
EXPECTED = {
    "acc": 0.75,
    "bwt": -0.15,
    "bwt_divisor": 2.0,
    "fwt": 0.075,
    "forgetting_max": 0.16,
    "aia": 0.795,
    "stage_acc": 0.75,
    "prior_avg": 0.55,
    "prior_avg_base": 0.65,
    "prior_delta": -0.10,
    "prior_forgetting": 0.10,
    "stage": 3,
}


def test_worked_example_summary() -> None:
    s = M.summarize(W, 3)
    expected = EXPECTED
    assert set(s) == set(expected)
    for key, value in expected.items():
        assert s[key] == pytest.approx(value, abs=1e-12), key


def test_worked_example_building_blocks() -> None:
    assert M.acc(W, 3) == pytest.approx(0.75)
    assert M.bwt(W, 3) == pytest.approx(-0.15)
    assert M.bwt(W, 3, divisor=3) == pytest.approx(-0.10)  # GEM code / TRACE divisor
    assert -M.bwt(W, 3) == pytest.approx(0.15)  # Avalanche StreamForgetting = -BWT
    assert M.fwt(W, 3) == pytest.approx(0.075)
    np.testing.assert_allclose(M.forgetting_per_task(W, 3), [0.22, 0.10], atol=1e-12)
    assert M.forgetting_max(W, 3) == pytest.approx(0.16)
    np.testing.assert_allclose(M.stage_accuracies(W, 3), [0.80, 0.835, 0.75], atol=1e-12)
    assert M.aia(W, 3) == pytest.approx(0.795)
    assert M.acc_lower_triangle(W, 3) == pytest.approx(0.78667, abs=5e-6)
    for k, avg in enumerate([0.65, 0.60, 0.58, 0.55]):
        assert M.prior_avg(W, 3, stage=k) == pytest.approx(avg), k
    assert M.prior_delta(W, 3) == pytest.approx(-0.10)
    assert M.prior_forgetting(W, 3) == pytest.approx(0.10)


def test_worked_example_intransigence() -> None:
    i = M.intransigence(W, (0.82, 0.88, 0.91))
    np.testing.assert_allclose(i, [0.02, 0.03, 0.01], atol=1e-12)
    assert i.mean() == pytest.approx(0.02)
    with pytest.raises(ValueError):
        M.intransigence(W, (0.8, 0.8, 0.8, 0.8))


def test_worked_example_normalized() -> None:
    n = M.normalized(W, 3)
    assert n.shape == (4, 3)
    np.testing.assert_array_equal(np.round(n, 4), W_NORMALIZED)


def test_normalized_external_max_and_zero_denominator() -> None:
    n = M.normalized(W, 3, col_max=[1.0, 0.85, 0.20])
    assert n[3, 0] == pytest.approx((0.60 - 0.30) / 0.70)  # max from another algorithm
    assert n[2, 1] == pytest.approx(1.0)
    assert np.isnan(n[:, 2]).all()  # max == base: zero denominator -> NaN, no warning
    with pytest.raises(ValueError):
        M.normalized(W, 3, col_max=[1.0, 1.0])


# ----------------------------------------------------------------------------- brute-force reference


def reference_summary(R: np.ndarray, T: int, k: int) -> dict[str, float]:
    """Plain loops straight from docs/metrics.md, 1-based indices; R_{i,j} = R[i][j-1]; no NaN inside."""
    G = len(R[0]) - T

    def r(i: int, j: int) -> float:
        return float(R[i][j - 1])

    def p(i: int, g: int) -> float:
        return float(R[i][T + g])

    out = dict.fromkeys(["acc", "bwt", "bwt_divisor", "fwt", "forgetting_max", "aia", "stage_acc"], NAN)
    if k >= 1:
        A = []
        for m in range(1, k + 1):
            total = 0.0
            for j in range(1, m + 1):
                total += r(m, j)
            A.append(total / m)
        out["acc"] = out["stage_acc"] = A[-1]
        out["aia"] = sum(A) / k
    if k >= 2:
        b = f = fg = 0.0
        for i in range(1, k):
            b += r(k, i) - r(i, i)
        for i in range(2, k + 1):
            f += r(i - 1, i) - r(0, i)
        for j in range(1, k):
            best = r(1, j)
            for row in range(2, k):
                best = max(best, r(row, j))
            fg += best - r(k, j)
        out.update(bwt=b / (k - 1), bwt_divisor=float(k - 1), fwt=f / (k - 1), forgetting_max=fg / (k - 1))
    out.update(prior_avg=NAN, prior_avg_base=NAN, prior_delta=NAN, prior_forgetting=NAN, stage=k)
    if G:
        out["prior_avg"] = sum(p(k, g) for g in range(G)) / G
        out["prior_avg_base"] = sum(p(0, g) for g in range(G)) / G
        out["prior_delta"] = sum(p(k, g) - p(0, g) for g in range(G)) / G
        if k >= 1:
            total = 0.0
            for g in range(G):
                best = p(0, g)
                for row in range(1, k):
                    best = max(best, p(row, g))
                total += best - p(k, g)
            out["prior_forgetting"] = total / G
    return out


@pytest.mark.parametrize("T,G", [(1, 0), (1, 2), (2, 1), (3, 0), (4, 3), (6, 6), (9, 2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summarize_matches_loop_reference(T: int, G: int, seed: int) -> None:
    full = np.random.default_rng(seed).uniform(size=(T + 1, T + G))
    for k in range(T + 1):
        partial = full.copy()
        partial[k + 1 :] = NAN  # the matrix as written after stage k
        want = reference_summary(full, T, k)
        for R, stage in ((partial, None), (partial, k), (full, k)):
            got = M.summarize(R, T, stage)
            assert set(got) == set(want)
            for key in want:
                assert same(got[key], want[key]), (T, G, seed, k, stage, key, got[key], want[key])


# ----------------------------------------------------------------------------- partial matrices and NaN


def test_partial_matrix_after_stage_one() -> None:
    R = W.copy()
    R[2:] = NAN
    s = M.summarize(R, 3)
    assert s["stage"] == 1
    assert s["acc"] == pytest.approx(0.80) and s["aia"] == pytest.approx(0.80)
    assert math.isnan(s["bwt"]) and math.isnan(s["fwt"]) and math.isnan(s["forgetting_max"])
    assert math.isnan(s["bwt_divisor"])
    assert s["prior_avg"] == pytest.approx(0.60)
    assert s["prior_delta"] == pytest.approx(-0.05)
    assert s["prior_forgetting"] == pytest.approx(0.05)
    n = M.normalized(R, 3)  # max over the rows that exist
    assert n[1, 0] == pytest.approx(1.0) and n[1, 1] == pytest.approx(1.0)
    assert np.isnan(n[2:]).all()


def test_partial_matrix_stage_zero() -> None:
    R = W.copy()
    R[1:] = NAN
    s = M.summarize(R, 3)
    assert s["stage"] == 0
    for key in ("acc", "bwt", "fwt", "forgetting_max", "aia", "stage_acc", "prior_forgetting"):
        assert math.isnan(s[key]), key
    assert s["prior_avg"] == pytest.approx(0.65) and s["prior_avg_base"] == pytest.approx(0.65)
    assert s["prior_delta"] == 0.0


def test_missing_cell_only_spoils_metrics_that_use_it() -> None:
    R = W.copy()
    R[1, 0] = NAN  # R_{1,1}: needed by BWT, F_3 (max over rows 1..2), A_1 and so AIA
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = M.summarize(R, 3)
    for key in ("bwt", "forgetting_max", "aia"):
        assert math.isnan(s[key]), key
    assert s["acc"] == pytest.approx(0.75)
    assert s["fwt"] == pytest.approx(0.075)
    assert s["prior_forgetting"] == pytest.approx(0.10)
    assert M.normalized(R, 3)[3, 0] == pytest.approx((0.60 - 0.30) / (0.82 - 0.30))
    assert np.isnan(M.normalized(R, 3)[1, 0])


def test_missing_cell_in_last_row() -> None:
    R = W.copy()
    R[3, 1] = NAN  # R_{3,2}: ACC, BWT, F_3 and A_3 need it; FWT and the prior metrics do not
    s = M.summarize(R, 3)
    assert s["stage"] == 3
    for key in ("acc", "stage_acc", "aia", "bwt", "forgetting_max"):
        assert math.isnan(s[key]), key
    assert s["fwt"] == pytest.approx(0.075) and s["prior_delta"] == pytest.approx(-0.10)
    np.testing.assert_allclose(M.stage_accuracies(R, 3)[:2], [0.80, 0.835])


def test_missing_base_row_spoils_row0_metrics() -> None:
    R = W.copy()
    R[0, :] = NAN
    s = M.summarize(R, 3)
    assert math.isnan(s["fwt"]) and math.isnan(s["prior_delta"]) and math.isnan(s["prior_forgetting"])
    assert s["bwt"] == pytest.approx(-0.15)
    assert np.isnan(M.normalized(R, 3)).all()


def test_all_nan_and_no_priors() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = M.summarize(np.full((4, 5), NAN), 3)
        assert s["stage"] == 0 and all(math.isnan(v) for k, v in s.items() if k != "stage")
        t = M.summarize(W[:, :3], 3)
    assert t["acc"] == pytest.approx(0.75)
    assert math.isnan(t["prior_avg"]) and math.isnan(t["prior_delta"]) and math.isnan(t["prior_forgetting"])


def test_bad_shapes_and_stages_raise() -> None:
    with pytest.raises(ValueError):
        M.summarize(W, 2)  # wrong number of rows
    with pytest.raises(ValueError):
        M.summarize(W[:, :2], 3)  # fewer columns than tasks
    with pytest.raises(ValueError):
        M.summarize(W, 3, stage=4)
    with pytest.raises(ValueError):
        M.acc(W, 3, stage=-1)


def test_pass_at_k_equals_the_fraction_of_k_subsets_with_a_correct_sample():
    import itertools

    from sdft_cli.metrics import pass_at_k

    for n in range(1, 8):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_at_k(200, 3, 128) == pytest.approx(1 - math.comb(197, 128) / math.comb(200, 128))
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_full_rows_pads_the_stages_still_to_come() -> None:
    """matrix.json of a run at stage 1 of 3 holds two rows; R has four, null cells NaN."""
    R = M.full_rows([[0.1, None], [0.5, 0.9]], n_tasks=3, n_cols=2)
    assert R.shape == (4, 2) and R[1, 1] == 0.9 and np.isnan(R[0, 1]) and np.isnan(R[2:]).all()
    assert M.last_stage(R) == 1
    assert np.isnan(M.full_rows([], n_tasks=1, n_cols=2)).all()
