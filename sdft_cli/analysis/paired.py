"""Comparisons between methods that pair what can be paired: the same test items (McNemar), the same
seed and task order (a sign-flip permutation test), the same new-task accuracy (acquisition-matched
forgetting), and the attractor check (BWT regressed on how high the first stage ended)."""

from __future__ import annotations

import math

import numpy as np

from sdft_cli import metrics as M
from sdft_cli.analysis.stats import least_squares, mcnemar, mean_ci, nearest, sign_flip
from sdft_cli.analysis.sweep import Run, Sweep, finite, run_metrics

PAIRED_METRICS = ("new_task", "acc", "bwt", "prior_avg")
# acquisition matching: a point of the other method counts as matched within this new-task accuracy
MATCH_TOLERANCE = 0.05


def _others(label: str) -> str:
    """A group's label without its method: the settings it shares with another method's group."""
    return ",".join(p for p in label.split(",") if not p.startswith("method="))


def pairs(groups: dict, selection: dict) -> list[tuple[str, str, str]]:
    """(A, B, why): groups of different methods with the same other settings, and each method's
    validation-selected group against the others'."""
    seq = [g for g, d in groups.items() if d["kind"] == "sequential"]
    out = []
    for i, a in enumerate(seq):
        for b in seq[i + 1 :]:
            if groups[a]["method"] != groups[b]["method"] and _others(a) == _others(b):
                out.append((a, b, "same settings"))
    chosen = [d["selected"] for d in selection.values() if d["selected"]]
    for i, a in enumerate(chosen):
        for b in chosen[i + 1 :]:
            if (a, b, "same settings") not in out and (b, a, "same settings") not in out:
                out.append((a, b, "selected on validation"))
    return out


def _blocks(a: list[Run], b: list[Run]) -> list[tuple[Run, Run]]:
    """Runs of A and B with the same seed and task order (unequal seed counts: only the shared ones)."""
    by = {(r.seed, r.order): r for r in b}
    return [(r, by[(r.seed, r.order)]) for r in a if (r.seed, r.order) in by]


def paired_tests(sweep: Sweep, groups: dict, selection: dict) -> list[dict]:
    out = []
    all_groups = sweep.groups
    for a, b, why in pairs(groups, selection):
        blocks = _blocks(all_groups[a], all_groups[b])
        tests: dict = {"a": a, "b": b, "why": why, "blocks": len(blocks), "mcnemar": {}, "permutation": {}}
        for column in sweep.tasks + sweep.priors:
            xa, xb = [], []
            for ra, rb in blocks:
                k = min(ra.stages, rb.stages)
                ia, ib = ra.items.get((k, column)), rb.items.get((k, column))
                if ia is not None and ib is not None and len(ia) == len(ib):
                    xa += ia
                    xb += ib
            if xa:
                tests["mcnemar"][column] = mcnemar(xa, xb)
        figs = [(run_metrics(ra), run_metrics(rb)) for ra, rb in blocks]
        for m in PAIRED_METRICS:
            tests["permutation"][m] = sign_flip([fa[m] - fb[m] for fa, fb in figs])
        out.append(tests)
    return out


def _points(run: Run) -> list[tuple[int, float, float]]:
    """(stage, accuracy on the task just trained, prior average): every stage's evaluation, and every
    periodic record that scored that task's test split and every prior column (the probes)."""
    R, T = run.R, len(run.tasks)
    pts = []
    for k in range(1, min(run.stages, T) + 1):
        task = run.tasks[k - 1]
        pts.append((k, float(R[k, k - 1]), M.prior_avg(R, T, k)))
        for rec in run.periodic.get(k, []):
            test, probes = rec.get("test", {}), rec.get("probes", {})
            if task in test and run.priors and all(p in probes for p in run.priors):
                prior = float(np.mean([probes[p]["value"] for p in run.priors]))
                pts.append((k, float(test[task]["value"]), prior))
    return pts


def acquisition_matched(sweep: Sweep) -> list[dict]:
    """For each method A and each other method B: every stage evaluation of A's runs, matched with the
    point of B (any of its groups, same task order and stage; stage ends and periodic records) whose
    accuracy on the task just trained is nearest; the prior averages compared where the two accuracies
    are within MATCH_TOLERANCE. A positive mean difference: at the same acquisition, A kept more."""
    by_method: dict[str, list[Run]] = {}
    for runs in sweep.sequential.values():
        for r in runs:
            by_method.setdefault(r.method, []).append(r)
    out = []
    for a, runs_a in sorted(by_method.items()):
        for b, runs_b in sorted(by_method.items()):
            if a == b:
                continue
            cand: dict[tuple, list[tuple[float, float]]] = {}
            for r in runs_b:
                for k, x, y in _points(r):
                    cand.setdefault((r.order, k), []).append((x, y))
            matched, total = [], 0
            for r in runs_a:
                for k in range(1, min(r.stages, len(r.tasks)) + 1):
                    x, y = float(r.R[k, k - 1]), M.prior_avg(r.R, len(r.tasks), k)
                    if math.isnan(x) or math.isnan(y):
                        continue
                    total += 1
                    hit = nearest(x, cand.get((r.order, k), []))
                    if hit is not None and abs(hit[0] - x) <= MATCH_TOLERANCE + 1e-9:
                        matched.append({"stage": k, "x": x, "y": y, "x_matched": hit[0], "y_matched": hit[1]})
            diffs = [m["y"] - m["y_matched"] for m in matched]
            out.append(
                {
                    "a": a,
                    "b": b,
                    "evaluations": total,
                    "matched": len(matched),
                    "prior_a": mean_ci([m["y"] for m in matched]),
                    "prior_b": mean_ci([m["y_matched"] for m in matched]),
                    "diff": mean_ci(diffs),
                    "abs_dx": mean_ci([abs(m["x"] - m["x_matched"]) for m in matched]),
                    "points": matched,
                }
            )
    return out


def attractor(sweep: Sweep) -> dict:
    """BWT at the last stage regressed on the accuracy the first stage reached on its task, per method
    and over all methods: a steep fit says forgetting mostly tracks how high stage 1 ended."""
    pts: dict[str, list[tuple[float, float]]] = {}
    for runs in sweep.sequential.values():
        for r in runs:
            if r.stages >= 2:
                f = run_metrics(r)
                pts.setdefault(r.method, []).append((f["stage1"], f["bwt"]))
    out = {
        m: {**least_squares([x for x, _ in p], [y for _, y in p]), "points": p}
        for m, p in sorted(pts.items())
    }
    every = [xy for p in pts.values() for xy in p]
    out["all"] = {**least_squares([x for x, _ in every], [y for _, y in every]), "points": every}
    out["all"]["n_finite"] = len(finite(y for _, y in every))
    return out
