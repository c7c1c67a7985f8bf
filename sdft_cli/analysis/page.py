"""``report.html`` (one self-contained file: the figures inline as PNG data, no script, no network) and
``report.md`` (the same tables, the figures linked from ``figures/``), from ``report.json``'s data."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from sdft_cli.analysis.build import TAU_TABLE
from sdft_cli.analysis.sweep import METRICS

CAPTIONS = {
    "matrices": "Mean forgetting matrix per group and task order: rows are stages (0 = the base), "
    "columns the trained tasks, then the prior capabilities after the white line.",
    "fig3_curves": "The paper's Fig. 3: every task's accuracy against optimizer steps, normalised per task "
    "(0 = the base model, 1 = the highest mean accuracy any group reached on it).",
    "fig4_pareto": "The paper's Fig. 4: new-task accuracy against the prior-capability average, one point "
    "per group (95% intervals over its runs); filled points are on the Pareto front.",
    "fig5_pass_at_k": "The paper's Fig. 5 (right): pass@k of each task right after it was trained, "
    "and the base model's.",
    "kl_vs_new_task": "KL from the base on each task's prompts (RL's Razor) against that task's accuracy.",
    "retention": "Retention at tolerance: the share of prior-capability evaluations that stay within τ "
    "points of the base.",
    "drift": "Drift per stage: distance of the weights from the base, KL from the base, completion "
    "length and entropy.",
    "acquisition_matched": "Acquisition-matched forgetting: each evaluation of one method next to the other "
    "method's evaluation with the nearest accuracy on the same task (within 5 points).",
    "attractor": "Attractor check: BWT at the end against the first stage's accuracy, with "
    "least-squares fits.",
}

METRIC_NAMES = {
    "new_task": "new task",
    "acc": "ACC",
    "bwt": "BWT",
    "fwt": "FWT",
    "forgetting_max": "forgetting F",
    "prior_avg": "prior avg",
    "prior_delta": "prior Δ",
}


def pct(m: dict | float | None, digits: int = 1) -> str:
    """A mean ± half-width (fractions) in points; '–' for none."""
    if m is None:
        return "–"
    if isinstance(m, dict):
        if m.get("mean") is None:
            return "–"
        ci = "" if m.get("ci") is None else f" ± {100 * m['ci']:.{digits}f}"
        return f"{100 * m['mean']:.{digits}f}{ci}"
    return f"{100 * m:.{digits}f}"


def num(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}g}" if abs(v) < 1e-3 and v else f"{v:.{digits}f}"


def tables(data: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(section id, title, header, rows) of every table, shared by the HTML and the Markdown."""
    out = []
    g = data["groups"]
    rows = [
        [label, d["kind"], str(len(d["runs"])), ", ".join(map(str, d["seeds"])), str(len(d["orders"]))]
        + [pct(d["metrics"][m]) for m in METRICS]
        + [pct(d["val"])]
        for label, d in g.items()
    ]
    out.append(
        (
            "summary",
            "Groups: mean ± 95% interval over runs (seeds × task orders), accuracy points",
            [
                "group",
                "curriculum",
                "runs",
                "seeds",
                "orders",
                *[METRIC_NAMES[m] for m in METRICS],
                "validation",
            ],
            rows,
        )
    )
    rows = [
        [label, order, *[pct(v[m]) for m in METRICS]]
        for label, d in g.items()
        for order, v in d["by_order"].items()
    ]
    out.append(("orders", "By task order", ["group", "order", *[METRIC_NAMES[m] for m in METRICS]], rows))
    rows = [
        [m, s["selected"] or "none (no validation scores)", pct(s["val"])]
        for m, s in data["selection"].items()
    ]
    out.append(
        (
            "selection",
            "Selected on validation (per method, highest mean validation score)",
            ["method", "selected", "validation"],
            rows,
        )
    )
    ref = data["references"]
    rows = [[t, pct(ref["single"].get(t)), pct(ref["joint"].get(t))] for t in data["tasks"]]
    out.append(
        (
            "references",
            "References: single-task fine-tune from the base, joint multi-task run",
            ["task", "single-task a*", "joint"],
            rows,
        )
    )
    rows = [
        [label, t, pct(v), pct(ref["joint_gap"].get(label, {}).get(t))]
        for label, d in ref["intransigence"].items()
        for t, v in d.items()
    ]
    out.append(
        (
            "intransigence",
            "Intransigence I = a* − R[k, k] and gap to the joint ceiling at the end",
            ["group", "task", "intransigence", "joint − final"],
            rows,
        )
    )
    rows = []
    for p in data["paired"]:
        for col, t in p["mcnemar"].items():
            rows.append(
                [
                    f"{p['a']} vs {p['b']}",
                    p["why"],
                    f"McNemar, {col}",
                    f"{t['only_a']} / {t['only_b']} of {t['items']}",
                    num(t["p"]),
                ]
            )
        for m, t in p["permutation"].items():
            diff = "–" if t["mean_diff"] is None else f"{100 * t['mean_diff']:+.1f}"
            rows.append(
                [
                    f"{p['a']} vs {p['b']}",
                    p["why"],
                    f"sign-flip, {METRIC_NAMES[m]}",
                    f"{diff} ({t['blocks']} blocks)",
                    num(t["p"]),
                ]
            )
    out.append(
        (
            "paired",
            "Paired tests (final stage): McNemar on the same items (only A right / only B right), "
            "seed-blocked sign-flip permutation on run metrics (A − B)",
            ["pair", "why", "test", "effect", "p"],
            rows,
        )
    )
    rows = [
        [
            r["a"],
            r["b"],
            f"{r['matched']} / {r['evaluations']}",
            pct(r["prior_a"]),
            pct(r["prior_b"]),
            pct(r["diff"]),
            pct(r["abs_dx"]),
        ]
        for r in data["acquisition"]
    ]
    out.append(
        (
            "acquisition",
            "Acquisition-matched forgetting: prior average of A and of B's evaluation with the nearest "
            "new-task accuracy (within 5 points)",
            ["A", "B", "matched", "prior A", "prior B", "A − B", "|Δ new task|"],
            rows,
        )
    )
    rows = [
        [m, num(f["slope"]), num(f["intercept"]), num(f["r2"]), num(f["p"]), str(f["n"])]
        for m, f in data["attractor"].items()
    ]
    out.append(
        (
            "attractor",
            "Attractor regression: BWT = intercept + slope · stage-1 accuracy",
            ["method", "slope", "intercept", "r²", "p", "n"],
            rows,
        )
    )
    rt = data["retention"]["table"]
    rows = [[label, *[pct(v[str(t)]) for t in TAU_TABLE], str(v["n"])] for label, v in rt.items()]
    out.append(
        (
            "retention",
            "Retention at tolerance (% of prior evaluations with base − value ≤ τ)",
            ["group", *[f"τ = {100 * t:.0f}" for t in TAU_TABLE], "evaluations"],
            rows,
        )
    )
    rows = [
        [
            label,
            k,
            num(v.get("to_base")),
            num(v.get("to_previous")),
            num(v.get("kl_to_base")),
            num(v.get("len_trained"), 1),
            num(v.get("entropy_trained")),
            num(v.get("entropy_prior")),
        ]
        for label, stages in data["drift"].items()
        for k, v in stages.items()
    ]
    out.append(
        (
            "drift",
            "Drift per stage (mean over runs)",
            [
                "group",
                "stage",
                "‖θ − θ0‖",
                "‖θ − θ_prev‖",
                "KL to base",
                "length (trained)",
                "entropy (trained)",
                "entropy (prior)",
            ],
            rows,
        )
    )
    return out


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f3f3}figure{margin:1em 0 2em}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:13px;color:#444}pre{background:#f6f6f6;padding:.6em;font-size:12px;overflow-x:auto}"""


def render_html(data: dict, figures: list[str], fig_dir: Path) -> str:
    head = "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>sdft report</title>"
    parts = [f"{head}<style>{CSS}</style></head><body><h1>Continual-learning report</h1>"]
    tasks, priors = html.escape(", ".join(data["tasks"])), html.escape(", ".join(data["priors"]))
    runs = data["provenance"]["runs"]
    parts.append(f"<p>{html.escape(data['root'])}: {runs} runs; tasks {tasks}; prior columns {priors}.</p>")
    for name in figures:
        b64 = base64.b64encode((fig_dir / f"{name}.png").read_bytes()).decode()
        parts.append(
            f"<figure id='{name}'><img alt='{name}' src='data:image/png;base64,{b64}'>"
            f"<figcaption>{html.escape(CAPTIONS.get(name, name))}</figcaption></figure>"
        )
    for sid, title, header, rows in tables(data):
        parts.append(f"<h2 id='{sid}'>{html.escape(title)}</h2>{_html_table(header, rows)}")
    parts.append(
        "<h2 id='provenance'>Provenance</h2><pre>" + html.escape(_provenance(data)) + "</pre></body></html>"
    )
    return "".join(parts)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    cell = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(data: dict, figures: list[str]) -> str:
    parts = ["# Continual-learning report", "", f"{data['root']}: {data['provenance']['runs']} runs.", ""]
    for name in figures:
        parts += [f"![{name}](figures/{name}.png)", "", CAPTIONS.get(name, name), ""]
    for _, title, header, rows in tables(data):
        parts += [f"## {title}", "", _md_table(header, rows), ""]
    parts += ["## Provenance", "", "```", _provenance(data), "```", ""]
    return "\n".join(parts)


def _provenance(data: dict) -> str:
    p = data["provenance"]
    lines = [f"sdft_cli {', '.join(p['sdft_cli'])}; git {', '.join(p['git'])}"]
    lines += [f"{k} {v}" for k, v in p["packages"].items()]
    lines += [f"data {t}: {', '.join(h[:12] for h in hs)}" for t, hs in p["data"].items()]
    lines += ["", *p["commands"]]
    return "\n".join(lines)
