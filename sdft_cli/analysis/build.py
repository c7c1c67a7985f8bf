"""The numbers of the report (``report.json``), computed from a sweep: every figure is drawn from them.

Conventions (docs/report.md): accuracies are fractions; a group pools its runs over seeds and task
orders; "new-task accuracy" is the mean over stages k of R[k, task trained at k] (plasticity); the prior
average is the mean of the prior columns at the last stage; intervals are 95% Student-t over runs.
"""

from __future__ import annotations

import math

import numpy as np

from sdft_cli.analysis import paired
from sdft_cli.analysis.stats import best_per_method, mean_ci, pareto_front, retention
from sdft_cli.analysis.sweep import METRICS, Sweep, finite, run_metrics

TAUS = [round(i / 100, 2) for i in range(0, 101)]
TAU_TABLE = (0.0, 0.02, 0.05, 0.1, 0.2)


def order_name(order: tuple[str, ...]) -> str:
    return " → ".join(order)


def _nanmean(rows: list[np.ndarray]) -> tuple[list, list]:
    """Cell-wise mean over the finite values and the count of them (None where there are none)."""
    stack = np.stack(rows)
    counts = np.isfinite(stack).sum(axis=0)
    with np.errstate(invalid="ignore"):
        mean = np.where(counts > 0, np.nansum(stack, axis=0) / np.maximum(counts, 1), np.nan)
    return [[None if math.isnan(v) else float(v) for v in row] for row in mean], counts.tolist()


def groups_section(sweep: Sweep) -> dict:
    out = {}
    for label, runs in sweep.groups.items():
        figs = [run_metrics(r) for r in runs]
        by_order: dict[str, dict] = {}
        for order in sorted({r.order for r in runs}):
            sub = [f for r, f in zip(runs, figs, strict=True) if r.order == order]
            by_order[order_name(order)] = {m: mean_ci([f[m] for f in sub]) for m in METRICS}
        val = [
            float(np.mean([r.val[t] for t in r.tasks])) if all(t in r.val for t in r.tasks) else None
            for r in runs
        ]
        out[label] = {
            "kind": runs[0].curriculum,
            "method": runs[0].method,
            "runs": [str(r.path.relative_to(sweep.root)) for r in runs],
            "seeds": sorted({r.seed for r in runs}),
            "orders": [order_name(o) for o in sorted({r.order for r in runs})],
            "metrics": {m: mean_ci([f[m] for f in figs]) for m in METRICS},
            "by_order": by_order,
            "val": mean_ci(val),
        }
    return out


def matrices_section(sweep: Sweep) -> dict:
    """Per group and task order: the mean matrix over its runs (the rows all of them reached)."""
    out: dict = {}
    for label, runs in sweep.groups.items():
        for order in sorted({r.order for r in runs}):
            sub = [r for r in runs if r.order == order]
            k = min(r.stages for r in sub)
            mean, counts = _nanmean([r.R[: k + 1] for r in sub])
            rows = [
                "base",
                *[f"{i}: {n}" for i, n in enumerate((sub[0].meta.get("stages") or sub[0].tasks)[:k], 1)],
            ]
            out.setdefault(label, {})[order_name(order)] = {
                "rows": rows,
                "columns": sub[0].columns,
                "kinds": sub[0].matrix["column_kinds"],
                "mean": mean,
                "n": counts,
            }
    return out


def curves_section(sweep: Sweep) -> dict:
    """Fig. 3: each task's accuracy against optimizer steps (summed over the stages before), per group
    and task order, the mean over its runs at each step: row 0 at step 0, the periodic test records
    during each stage, the stage's evaluation at its end. Normalised per task as the paper does: 0 = the
    base accuracy, 1 = the highest mean accuracy any group reached on it (across methods)."""
    raw: dict = {}
    for label, runs in sweep.sequential.items():
        for order in sorted({r.order for r in runs}):
            per_task: dict[str, dict[int, list[float]]] = {}
            for run in (r for r in runs if r.order == order):
                offsets = run.offsets()
                for task in run.tasks:
                    pts = per_task.setdefault(task, {})
                    pts.setdefault(0, []).append(run.cell(0, task))
                    for k in range(1, run.stages + 1):
                        for rec in run.periodic.get(k, []):
                            cell = rec.get("test", {}).get(task)
                            if cell is not None and rec["step"] < run.steps.get(k, 0):
                                pts.setdefault(offsets[k] + rec["step"], []).append(float(cell["value"]))
                        pts.setdefault(offsets[k] + run.steps.get(k, 0), []).append(run.cell(k, task))
            raw.setdefault(label, {})[order_name(order)] = {
                t: sorted((s, float(np.mean(finite(v))), len(finite(v))) for s, v in pts.items() if finite(v))
                for t, pts in per_task.items()
            }
    base = {
        t: float(np.mean(finite(r.cell(0, t) for r in sweep.runs if t in r.columns))) for t in sweep.tasks
    }
    best = {
        t: max(
            (a for g in raw.values() for o in g.values() for s, a, n in o.get(t, [])), default=float("nan")
        )
        for t in sweep.tasks
    }
    out: dict = {"base": base, "best": best, "curves": {}}
    for label, orders in raw.items():
        for order, tasks in orders.items():
            for t, pts in tasks.items():
                span = best[t] - base[t]
                norm = [(a - base[t]) / span if span > 0 else None for _, a, _ in pts]
                out["curves"].setdefault(label, {}).setdefault(order, {})[t] = [
                    {"step": s, "acc": a, "normalized": z, "n": n}
                    for (s, a, n), z in zip(pts, norm, strict=True)
                ]
    return out


def pareto_section(groups: dict) -> list[dict]:
    """Fig. 4: new-task accuracy against the prior average, one point per sequential group."""
    pts = [(g, d) for g, d in groups.items() if d["kind"] == "sequential"]
    xy = [(_nan(d["metrics"]["new_task"]["mean"]), _nan(d["metrics"]["prior_avg"]["mean"])) for _, d in pts]
    front = pareto_front(xy)
    return [
        {
            "group": g,
            "method": d["method"],
            "x": d["metrics"]["new_task"],
            "y": d["metrics"]["prior_avg"],
            "front": f,
        }
        for (g, d), f in zip(pts, front, strict=True)
    ]


def _nan(v) -> float:
    return float("nan") if v is None else float(v)


def pass_at_k_section(sweep: Sweep) -> dict:
    """Fig. 5 right: pass@k of each task right after it was trained (mean over tasks and runs) and of
    the base model on the same tasks, per group; empty when no run sampled it."""
    out: dict = {}
    for label, runs in sweep.sequential.items():
        trained: dict[str, list[float]] = {}
        base: dict[str, list[float]] = {}
        for run in runs:
            for k, task in enumerate(run.tasks, start=1):
                for ks, v in run.pass_at_k.get(k, {}).get(task, {}).items():
                    trained.setdefault(ks, []).append(v)
                for ks, v in run.pass_at_k.get(0, {}).get(task, {}).items():
                    base.setdefault(ks, []).append(v)
        if trained:
            key = lambda s: int(s)  # noqa: E731
            out[label] = {
                "trained": {
                    k: float(np.mean(v)) for k, v in sorted(trained.items(), key=lambda kv: key(kv[0]))
                },
                "base": {k: float(np.mean(v)) for k, v in sorted(base.items(), key=lambda kv: key(kv[0]))},
            }
    return out


def kl_section(sweep: Sweep) -> list[dict]:
    """KL from the base (RL's Razor, on the task's own prompts) against that task's accuracy, per run
    and stage."""
    out = []
    for label, runs in sweep.sequential.items():
        for run in runs:
            for k, task in enumerate(run.tasks[: run.stages], start=1):
                out.append(
                    {
                        "group": label,
                        "run": run.path.name,
                        "stage": k,
                        "task": task,
                        "kl": _or_none(run.kl_to_base(k)),
                        "new_task": _or_none(run.cell(k, task)),
                    }
                )
    return out


def _or_none(v: float) -> float | None:
    return None if v is None or math.isnan(v) else float(v)


def retention_section(sweep: Sweep) -> dict:
    """The share of prior-capability evaluations (every run, stage ≥ 1 and prior column) that stay within
    τ of the base (base − value ≤ τ), for τ from 0 to 1 (0 to 100 points)."""
    curves, table = {}, {}
    for label, runs in sweep.sequential.items():
        drops = [
            run.cell(0, p) - run.cell(k, p)
            for run in runs
            for k in range(1, run.stages + 1)
            for p in run.priors
        ]
        curves[label] = retention(drops, TAUS)
        table[label] = {str(t): curves[label][TAUS.index(t)] for t in TAU_TABLE}
        table[label]["n"] = len(finite(drops))
    return {"taus": TAUS, "curves": curves, "table": table}


def drift_section(sweep: Sweep) -> dict:
    """Per group and stage: the weights' distance from the base and from the previous model, KL from the
    base on the task just trained, and the greedy completions' length and entropy (trained and prior
    columns), each the mean over runs."""
    out: dict = {}
    for label, runs in sweep.sequential.items():
        stages = max(r.stages for r in runs)
        for k in range(0, stages + 1):
            vals: dict[str, list] = {}
            for run in (r for r in runs if r.stages >= k):
                d = run.drift.get(k, {})
                w = d.get("weights", {})
                vals.setdefault("to_base", []).append(w.get("to_base"))
                vals.setdefault("to_previous", []).append(w.get("to_previous"))
                vals.setdefault("kl_to_base", []).append(run.kl_to_base(k) if k else None)
                cols = d.get("columns", {})
                for kind, names in (("trained", run.tasks), ("prior", run.priors)):
                    got = [cols[n] for n in names if n in cols]
                    vals.setdefault(f"len_{kind}", []).append(
                        np.mean([c["len_mean"] for c in got]) if got else None
                    )
                    vals.setdefault(f"entropy_{kind}", []).append(
                        np.mean([c["entropy_token"] for c in got]) if got else None
                    )
            out.setdefault(label, {})[str(k)] = {key: mean_ci(v)["mean"] for key, v in vals.items()}
    return out


def references_section(sweep: Sweep, groups: dict) -> dict:
    """The single-task reference (each task trained alone from the base: R[i, task i]) and the joint run
    (every task at once: R[1, task]); intransigence I_k = a*_k − R[k, k] against the single-task
    reference, and each group's final gap to the joint ceiling, per task, mean over runs."""
    single = {}
    for run in sweep.references("single"):
        for k, task in enumerate(run.tasks[: run.stages], start=1):
            single.setdefault(task, []).append(run.cell(k, task))
    joint = {}
    for run in sweep.references("joint"):
        if run.stages >= 1:
            for task in run.tasks:
                joint.setdefault(task, []).append(run.cell(1, task))
    ref_single = {t: mean_ci(v) for t, v in single.items()}
    ref_joint = {t: mean_ci(v) for t, v in joint.items()}
    intransigence, gap = {}, {}
    for label, runs in sweep.sequential.items():
        for task in sweep.tasks:
            a_star, ceiling = ref_single.get(task, {}).get("mean"), ref_joint.get(task, {}).get("mean")
            learned = [r.cell(r.tasks.index(task) + 1, task) for r in runs if r.tasks.index(task) < r.stages]
            final = [r.cell(r.stages, task) for r in runs]
            if a_star is not None:
                intransigence.setdefault(label, {})[task] = mean_ci([a_star - v for v in learned])
            if ceiling is not None:
                gap.setdefault(label, {})[task] = mean_ci([ceiling - v for v in final])
    return {"single": ref_single, "joint": ref_joint, "intransigence": intransigence, "joint_gap": gap}


def selection_section(groups: dict) -> dict:
    """Per method, the sequential group with the highest mean validation score (none without one)."""
    candidates: dict[str, dict[str, float | None]] = {}
    for label, d in groups.items():
        if d["kind"] == "sequential":
            every = d["val"]["n"] == len(d["runs"])  # a group lacking a run's score cannot be chosen
            candidates.setdefault(d["method"], {})[label] = d["val"]["mean"] if every else None
    return best_per_method(candidates)


def provenance_section(sweep: Sweep) -> dict:
    pv = [r.provenance for r in sweep.runs if r.provenance]
    data: dict[str, set] = {}
    for p in pv:
        for task, h in p.get("data", {}).items():
            data.setdefault(task, set()).add(h)
    return {
        "sdft_cli": sorted({str(p.get("sdft_cli")) for p in pv}),
        "git": sorted({str(p.get("git")) for p in pv}),
        "packages": pv[0].get("packages", {}) if pv else {},
        "data": {t: sorted(h) for t, h in sorted(data.items())},
        "commands": sorted({"sdft run " + " ".join(r.overrides) for r in sweep.runs}),
        "runs": len(sweep.runs),
    }


def build(sweep: Sweep) -> dict:
    groups = groups_section(sweep)
    selection = selection_section(groups)
    return {
        "root": str(sweep.root),
        "tasks": sweep.tasks,
        "priors": sweep.priors,
        "groups": groups,
        "selection": selection,
        "matrices": matrices_section(sweep),
        "fig3": curves_section(sweep),
        "pareto": pareto_section(groups),
        "pass_at_k": pass_at_k_section(sweep),
        "kl_vs_new": kl_section(sweep),
        "retention": retention_section(sweep),
        "drift": drift_section(sweep),
        "references": references_section(sweep, groups),
        "paired": paired.paired_tests(sweep, groups, selection),
        "acquisition": paired.acquisition_matched(sweep),
        "attractor": paired.attractor(sweep),
        "provenance": provenance_section(sweep),
    }
