"""The report's statistics, each small enough to check by hand: Student-t intervals, the exact McNemar
test on paired items, a seed-blocked sign-flip permutation test, the Pareto front, retention at a
tolerance, least squares, and matching by new-task accuracy."""

from __future__ import annotations

import itertools
import math

import numpy as np


def mean_ci(values, confidence: float = 0.95) -> dict:
    """Mean, half-width of the two-sided Student-t interval and n over the finite values (the half-width
    is None for one value, everything None for none)."""
    from scipy import stats

    x = np.array([float(v) for v in values if v is not None and not math.isnan(float(v))], dtype=float)
    if x.size == 0:
        return {"mean": None, "ci": None, "n": 0}
    if x.size == 1:
        return {"mean": float(x[0]), "ci": None, "n": 1}
    half = stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return {"mean": float(x.mean()), "ci": float(half), "n": int(x.size)}


def best_per_method(candidates: dict[str, dict[str, float | None]]) -> dict:
    """Selection on validation: per method, among its candidate settings (label -> mean validation
    score, None when a run lacks one), the highest score; ties go to the first label."""
    out = {}
    for method, scores in candidates.items():
        valid = [(label, v) for label, v in scores.items() if v is not None and not math.isnan(v)]
        best = max(valid, key=lambda c: c[1]) if valid else None
        out[method] = {"selected": best[0] if best else None, "val": best[1] if best else None}
        out[method]["candidates"] = dict(scores)
    return out


def mcnemar(a: list[float], b: list[float]) -> dict:
    """Exact two-sided McNemar test on paired binary outcomes (1 = correct): ``b01`` items only A got
    right, ``b10`` only B; p = 2 · P(X ≤ min) for X ~ Binomial(b01 + b10, 1/2), capped at 1."""
    from scipy import stats

    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x >= 1 and y < 1)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if x < 1 and y >= 1)
    n = only_a + only_b
    p = 1.0 if n == 0 else min(1.0, 2 * float(stats.binom.cdf(min(only_a, only_b), n, 0.5)))
    return {"only_a": only_a, "only_b": only_b, "items": len(a), "p": p}


def sign_flip(diffs: list[float], exact_up_to: int = 16, samples: int = 20000, seed: int = 0) -> dict:
    """Seed-blocked permutation test of a mean paired difference: each block (a seed, and a task order)
    holds one run of each method, and under the null the two labels are exchangeable within it, so each
    block's difference keeps or flips its sign. p = share of the 2^n sign patterns (all of them up to
    ``exact_up_to`` blocks, else ``samples`` random ones) whose |mean| reaches the observed |mean|."""
    d = np.array([x for x in diffs if not math.isnan(x)], dtype=float)
    if d.size == 0:
        return {"mean_diff": None, "p": None, "blocks": 0, "exact": True}
    observed = abs(d.mean())
    if d.size <= exact_up_to:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
        exact = True
    else:
        signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(samples, d.size))
        exact = False
    means = np.abs((signs * d).mean(axis=1))
    p = float(np.mean(means >= observed - 1e-12))
    return {"mean_diff": float(d.mean()), "p": p, "blocks": int(d.size), "exact": exact}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """Which points no other point dominates (at least as high on both axes, higher on one)."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y and (x2 > x or y2 > y)) for j, (x2, y2) in enumerate(points) if j != i
        )
        out.append(not dominated and not (math.isnan(x) or math.isnan(y)))
    return out


def retention(drops: list[float], taus: list[float]) -> list[float]:
    """For each tolerance τ: the share of evaluations whose drop below the base (base − value) is at most
    τ (NaN drops are left out)."""
    d = np.array([x for x in drops if not math.isnan(x)], dtype=float)
    if d.size == 0:
        return [float("nan")] * len(taus)
    return [float(np.mean(d <= t + 1e-12)) for t in taus]


def least_squares(x: list[float], y: list[float]) -> dict:
    """y = intercept + slope · x over the finite pairs, with r², n and the slope's two-sided p-value."""
    from scipy import stats

    pairs = [(a, b) for a, b in zip(x, y, strict=True) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2:
        return {"slope": None, "intercept": None, "r2": None, "p": None, "n": len(pairs)}
    fit = stats.linregress([a for a, _ in pairs], [b for _, b in pairs])
    return {
        "slope": float(fit.slope),
        "intercept": float(fit.intercept),
        "r2": float(fit.rvalue**2),
        "p": float(fit.pvalue),
        "n": len(pairs),
    }


def nearest(x: float, candidates: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The candidate (x', y') with the smallest |x' − x| (the first of equals); None for none."""
    finite = [c for c in candidates if not (math.isnan(c[0]) or math.isnan(c[1]))]
    return min(finite, key=lambda c: abs(c[0] - x)) if finite else None
