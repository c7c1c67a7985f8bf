"""Continual-learning metrics over the forgetting matrix R (definitions: docs/metrics.md).

Pure numpy and no I/O, so a live run, a report and a unit test all get the same numbers. R has rows
0..T (row 0 = base model before training, row i = after training on task i) and columns = the T
trained tasks in curriculum order, then G prior-capability probes. Every metric is computed "as if the
sequence ended at stage k", so the partial matrix written after each stage already gives meaningful
numbers. A missing (NaN) cell makes exactly the metrics that need it NaN; nothing raises on NaN.

Conventions, stated in every report: BWT and FWT divide by k-1 (GEM paper form; ``divisor=k`` gives the
GEM-code/TRACE variant); FWT subtracts row 0 instead of GEM's random-init baseline; ``forgetting_max``
is Chaudhry's F_k (max over rows 1..k-1); prior-capability forgetting takes the max over rows 0..k-1.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NAN = float("nan")


def _mean(x: np.ndarray | Sequence[float]) -> float:
    x = np.asarray(x, dtype=float)
    return float(x.mean()) if x.size else NAN


def _check(R: np.ndarray, n_tasks: int) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or n_tasks < 0 or R.shape[0] != n_tasks + 1 or R.shape[1] < n_tasks:
        raise ValueError(f"R must have shape (T+1, T+G) with T={n_tasks}, got {R.shape}")
    return R


def full_rows(values: Sequence[Sequence[float | None]], n_tasks: int, n_cols: int) -> np.ndarray:
    """R with rows 0..T from a matrix.json's ``values``, which hold only the rows evaluated so far:
    NaN rows for the stages still to come, NaN for a null cell."""
    R = np.full((n_tasks + 1, n_cols), NAN)
    got = [[NAN if v is None else float(v) for v in row] for row in values[: n_tasks + 1]]
    if got:
        R[: len(got)] = got
    return R


def last_stage(R: np.ndarray) -> int:
    """k = index of the last row of R holding any non-NaN value (0 when R is all NaN)."""
    rows = np.flatnonzero(~np.isnan(np.asarray(R, dtype=float)).all(axis=1))
    return int(rows[-1]) if rows.size else 0


def _stage(R: np.ndarray, n_tasks: int, stage: int | None) -> tuple[np.ndarray, int]:
    R = _check(R, n_tasks)
    k = last_stage(R) if stage is None else int(stage)
    if not 0 <= k <= n_tasks:
        raise ValueError(f"stage must be in 0..{n_tasks}, got {stage}")
    return R, k


# ----------------------------------------------------------------------------- trained-task metrics


def acc(R: np.ndarray, n_tasks: int, stage: int | None = None) -> float:
    """ACC_k = (1/k) sum_{j=1..k} R_{k,j}; NaN at k = 0."""
    R, k = _stage(R, n_tasks, stage)
    return _mean(R[k, :k]) if k >= 1 else NAN


def bwt(R: np.ndarray, n_tasks: int, stage: int | None = None, divisor: float | None = None) -> float:
    """BWT_k = (1/d) sum_{j=1..k-1} (R_{k,j} - R_{j,j}), d = k-1 by default (pass d = k for GEM code)."""
    R, k = _stage(R, n_tasks, stage)
    if k < 2:
        return NAN
    j = np.arange(1, k)
    return float(np.sum(R[k, j - 1] - R[j, j - 1]) / (k - 1 if divisor is None else divisor))


def fwt(R: np.ndarray, n_tasks: int, stage: int | None = None) -> float:
    """FWT_k = (1/(k-1)) sum_{j=2..k} (R_{j-1,j} - R_{0,j}); row 0 (base model) replaces GEM's b."""
    R, k = _stage(R, n_tasks, stage)
    if k < 2:
        return NAN
    j = np.arange(2, k + 1)
    return _mean(R[j - 1, j - 1] - R[0, j - 1])


def forgetting_per_task(R: np.ndarray, n_tasks: int, stage: int | None = None) -> np.ndarray:
    """f_j^k = max_{l=1..k-1} R_{l,j} - R_{k,j} for j = 1..k-1 (Chaudhry et al. 2018)."""
    R, k = _stage(R, n_tasks, stage)
    if k < 2:
        return np.empty(0)
    return R[1:k, : k - 1].max(axis=0) - R[k, : k - 1]


def forgetting_max(R: np.ndarray, n_tasks: int, stage: int | None = None) -> float:
    """F_k = (1/(k-1)) sum_{j=1..k-1} f_j^k (Chaudhry average forgetting); NaN for k < 2."""
    return _mean(forgetting_per_task(R, n_tasks, stage))


def stage_accuracies(R: np.ndarray, n_tasks: int, stage: int | None = None) -> np.ndarray:
    """[A_1, ..., A_k] with A_m = (1/m) sum_{j=1..m} R_{m,j}."""
    R, k = _stage(R, n_tasks, stage)
    return np.array([_mean(R[m, :m]) for m in range(1, k + 1)], dtype=float)


def aia(R: np.ndarray, n_tasks: int, stage: int | None = None) -> float:
    """AIA_k = (1/k) sum_{m=1..k} A_m (average incremental accuracy, iCaRL); NaN at k = 0."""
    return _mean(stage_accuracies(R, n_tasks, stage))


def acc_lower_triangle(R: np.ndarray, n_tasks: int, stage: int | None = None) -> float:
    """Diaz-Rodriguez ACC = sum_{1<=j<=i<=k} R_{i,j} / (k(k+1)/2)."""
    R, k = _stage(R, n_tasks, stage)
    return _mean([R[i, j - 1] for i in range(1, k + 1) for j in range(1, i + 1)])


def intransigence(R: np.ndarray, reference: Sequence[float] | np.ndarray) -> np.ndarray:
    """I_k = a*_k - R_{k,k} for k = 1..len(reference); a* is a reference model's accuracy (say which)."""
    R = np.asarray(R, dtype=float)
    ref = np.asarray(reference, dtype=float).ravel()
    if R.ndim != 2 or ref.size > min(R.shape[0] - 1, R.shape[1]):
        raise ValueError(f"reference has {ref.size} entries, more than the tasks of R {R.shape}")
    k = np.arange(1, ref.size + 1)
    return ref - R[k, k - 1]


def normalized(
    R: np.ndarray, n_tasks: int, col_max: Sequence[float] | np.ndarray | None = None
) -> np.ndarray:
    """N_{i,j} = (R_{i,j} - R_{0,j}) / (max_{i'} R_{i',j} - R_{0,j}) over trained columns (SDFT Fig. 3).

    ``col_max`` supplies the column maxima from outside (e.g. the max across algorithms); by default the
    max runs over this matrix only. A column whose denominator is zero, negative or NaN is all NaN.
    """
    X = _check(R, n_tasks)[:, :n_tasks]
    top = np.fmax.reduce(X, axis=0) if col_max is None else np.asarray(col_max, dtype=float).ravel()
    if top.shape != (n_tasks,):
        raise ValueError(f"col_max must have {n_tasks} entries, got {top.shape}")
    denom = top - X[0]
    ok = denom > 0  # False for NaN too
    out = np.full(X.shape, NAN)
    out[:, ok] = (X[:, ok] - X[0, ok]) / denom[ok]
    return out


# ----------------------------------------------------------------------------- prior-capability metrics


def prior_avg(R: np.ndarray, n_tasks: int, stage: int | None = None) -> float:
    """PriorAvg_k = (1/G) sum_g R_{k,g} (unweighted, as the SDFT paper's "Avg."); NaN if G = 0."""
    R, k = _stage(R, n_tasks, stage)
    return _mean(R[k, n_tasks:])


def prior_delta(R: np.ndarray, n_tasks: int, stage: int | None = None) -> float:
    """dR^G_k = (1/G) sum_g (R_{k,g} - R_{0,g}); NaN if G = 0."""
    R, k = _stage(R, n_tasks, stage)
    return _mean(R[k, n_tasks:] - R[0, n_tasks:])


def prior_forgetting(R: np.ndarray, n_tasks: int, stage: int | None = None) -> float:
    """(1/G) sum_g f_g^k with f_g^k = max_{l=0..k-1} R_{l,g} - R_{k,g} (max includes the base row)."""
    R, k = _stage(R, n_tasks, stage)
    if k < 1:
        return NAN
    P = R[:, n_tasks:]
    return _mean(P[:k].max(axis=0) - P[k])


# ----------------------------------------------------------------------------- summary


def summarize(R: np.ndarray, n_tasks: int, stage: int | None = None) -> dict[str, float]:
    """All headline metrics at stage k (default: the last row with any value), as if T were k."""
    R, k = _stage(R, n_tasks, stage)
    return {
        "acc": acc(R, n_tasks, k),
        "bwt": bwt(R, n_tasks, k),
        "bwt_divisor": float(k - 1) if k >= 2 else NAN,
        "fwt": fwt(R, n_tasks, k),
        "forgetting_max": forgetting_max(R, n_tasks, k),
        "aia": aia(R, n_tasks, k),
        "stage_acc": acc(R, n_tasks, k),
        "prior_avg": prior_avg(R, n_tasks, k),
        "prior_avg_base": prior_avg(R, n_tasks, 0),
        "prior_delta": prior_delta(R, n_tasks, k),
        "prior_forgetting": prior_forgetting(R, n_tasks, k),
        "stage": k,
    }


# ----------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021):
    1 - C(n-c, k) / C(n, k), computed as a product so large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
