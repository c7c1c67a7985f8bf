"""The report's figures, each drawn from ``report.json``'s numbers alone (so a test of those numbers is a
test of what the figure shows), written as PNG and SVG under ``figures/``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
MAX_PANELS = 24


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path, name: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    fig.savefig(out / f"{name}.svg", bbox_inches="tight")
    _plt().close(fig)
    return name


def _colors(labels) -> dict[str, str]:
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}


def _v(x) -> float:
    return float("nan") if x is None else float(x)


def _single(size: tuple[float, float] = (6.5, 4.8)):
    return _plt().subplots(figsize=size, layout="constrained")


def _label(ax, xlabel: str, ylabel: str, title: str, legend: int = 7) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=legend)


def _grid(n: int, cols: int = 3):
    plt = _plt()
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.4 * cols, 3.6 * rows), squeeze=False, layout="constrained"
    )
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat)


def matrices(data: dict, out: Path) -> str | None:
    panels = [(g, o, m) for g, orders in data["matrices"].items() for o, m in orders.items()][:MAX_PANELS]
    if not panels:
        return None
    fig, axes = _grid(len(panels))
    for ax, (group, order, m) in zip(axes, panels, strict=False):
        V = 100 * np.array([[_v(x) for x in row] for row in m["mean"]], dtype=float)
        ax.imshow(np.ma.masked_invalid(V), cmap="viridis", vmin=0, vmax=100, aspect="auto")
        for (i, j), v in np.ndenumerate(V):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="w" if v < 60 else "k")
        ax.set_xticks(range(len(m["columns"])), m["columns"], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(m["rows"])), m["rows"], fontsize=7)
        trained = m["kinds"].count("trained")
        ax.axvline(trained - 0.5, color="w", lw=2)
        ax.set_title(f"{group}\n{order}", fontsize=8)
    fig.suptitle("Mean forgetting matrix per group and task order (accuracy %, mean over seeds)", fontsize=10)
    return _save(fig, out, "matrices")


def fig3(data: dict, out: Path) -> str | None:
    panels = [(g, o, t) for g, orders in data["fig3"]["curves"].items() for o, t in orders.items()][
        :MAX_PANELS
    ]
    if not panels:
        return None
    colors = _colors(data["tasks"])
    fig, axes = _grid(len(panels))
    for ax, (group, order, tasks) in zip(axes, panels, strict=False):
        for task, pts in tasks.items():
            xs = [p["step"] for p in pts]
            ys = [_v(p["normalized"]) for p in pts]
            ax.plot(xs, ys, marker=".", ms=3, color=colors.get(task), label=task)
        ax.axhline(0, color="grey", lw=0.6, ls="--")
        ax.axhline(1, color="grey", lw=0.6, ls=":")
        ax.set_ylim(-1.1, 1.1)
        ax.set_xlabel("optimizer steps", fontsize=8)
        ax.set_ylabel("normalized accuracy", fontsize=8)
        ax.set_title(f"{group}\n{order}", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(
        "Per-task accuracy against steps (paper Fig. 3): 0 = base, 1 = best of any group", fontsize=10
    )
    return _save(fig, out, "fig3_curves")


def pareto(data: dict, out: Path) -> str | None:
    pts = data["pareto"]
    if not pts:
        return None
    fig, ax = _single((7, 5.5))
    colors = _colors(sorted({p["method"] for p in pts}))
    for p in pts:
        x, y = _v(p["x"]["mean"]) * 100, _v(p["y"]["mean"]) * 100
        xe = _v(p["x"]["ci"]) * 100 if p["x"]["ci"] is not None else 0
        ye = _v(p["y"]["ci"]) * 100 if p["y"]["ci"] is not None else 0
        ax.errorbar(
            x,
            y,
            xerr=xe,
            yerr=ye,
            fmt="o",
            color=colors[p["method"]],
            capsize=3,
            mfc="none" if not p["front"] else colors[p["method"]],
        )
        ax.annotate(p["group"], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    front = sorted((_v(p["x"]["mean"]) * 100, _v(p["y"]["mean"]) * 100) for p in pts if p["front"])
    if front:
        ax.plot(*zip(*front, strict=True), color="k", lw=1, ls="--", label="Pareto front")
    for m, c in colors.items():
        ax.plot([], [], "o", color=c, label=m)
    ax.set_xlim(-3, 103)
    ax.set_ylim(-3, 103)
    title = "New-task accuracy vs prior capabilities (paper Fig. 4)\nfilled: on the front; bars: 95% CI"
    _label(ax, "new-task accuracy (%)", "prior-capability average (%)", title, legend=8)
    return _save(fig, out, "fig4_pareto")


def pass_at_k(data: dict, out: Path) -> str | None:
    if not data["pass_at_k"]:
        return None
    fig, ax = _single()
    colors = _colors(list(data["pass_at_k"]))
    base_drawn = False
    for group, d in data["pass_at_k"].items():
        ks = [int(k) for k in d["trained"]]
        ax.plot(ks, [d["trained"][str(k)] for k in ks], marker="o", color=colors[group], label=group)
        if d["base"] and not base_drawn:
            kb = [int(k) for k in d["base"]]
            ax.plot(kb, [d["base"][str(k)] for k in kb], marker="s", color="k", ls="--", label="base")
            base_drawn = True
    ax.set_xscale("log", base=2)
    _label(ax, "k", "pass@k", "pass@k of each task right after its training (paper Fig. 5 right)")
    return _save(fig, out, "fig5_pass_at_k")


def kl_vs_new(data: dict, out: Path) -> str | None:
    pts = [p for p in data["kl_vs_new"] if p["kl"] is not None and p["new_task"] is not None]
    if not pts:
        return None
    fig, ax = _single()
    colors = _colors(sorted({p["group"] for p in pts}))
    for g, c in colors.items():
        sub = [p for p in pts if p["group"] == g]
        ax.scatter([p["kl"] for p in sub], [100 * p["new_task"] for p in sub], color=c, s=14, label=g)
    x = "KL(base ‖ model) per token on the task's prompts (nats)"
    title = "Distance from the base vs new-task accuracy, per run and stage"
    _label(ax, x, "accuracy on the task just trained (%)", title, legend=6)
    return _save(fig, out, "kl_vs_new_task")


def retention(data: dict, out: Path) -> str | None:
    curves = data["retention"]["curves"]
    if not curves:
        return None
    fig, ax = _single()
    colors = _colors(list(curves))
    taus = [100 * t for t in data["retention"]["taus"]]
    for g, ys in curves.items():
        ax.plot(taus, [_v(y) for y in ys], color=colors[g], label=g)
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    title = "Retention at tolerance: base − value ≤ τ, every stage and prior column"
    _label(
        ax, "tolerance τ (points below the base)", "share of prior-capability evaluations retained", title, 6
    )
    return _save(fig, out, "retention")


DRIFT_PANELS = (
    ("to_base", "‖θ − θ_base‖₂"),
    ("kl_to_base", "KL(base ‖ model), task just trained"),
    ("len_trained", "greedy completion length (tokens), trained tasks"),
    ("entropy_prior", "entropy per token (nats), prior columns"),
)


def drift(data: dict, out: Path) -> str | None:
    if not data["drift"]:
        return None
    plt = _plt()
    fig, axes = plt.subplots(
        1, len(DRIFT_PANELS), figsize=(4.4 * len(DRIFT_PANELS), 3.8), squeeze=False, layout="constrained"
    )
    colors = _colors(list(data["drift"]))
    for ax, (key, title) in zip(axes[0], DRIFT_PANELS, strict=True):
        for g, stages in data["drift"].items():
            ks = sorted(int(k) for k in stages)
            ax.plot(ks, [_v(stages[str(k)].get(key)) for k in ks], marker="o", color=colors[g], label=g)
        ax.set_xlabel("stage")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(title, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=7)
    fig.suptitle("Drift per stage (mean over runs)", fontsize=10)
    return _save(fig, out, "drift")


def acquisition(data: dict, out: Path) -> str | None:
    rows = [r for r in data["acquisition"] if r["points"]]
    if not rows:
        return None
    fig, axes = _grid(len(rows), cols=min(3, len(rows)))
    for ax, r in zip(axes, rows, strict=False):
        for p in r["points"]:
            ax.plot(
                [100 * p["x"], 100 * p["x_matched"]],
                [100 * p["y"], 100 * p["y_matched"]],
                color="grey",
                lw=0.6,
            )
        ax.scatter(
            [100 * p["x"] for p in r["points"]], [100 * p["y"] for p in r["points"]], s=12, label=r["a"]
        )
        ax.scatter(
            [100 * p["x_matched"] for p in r["points"]],
            [100 * p["y_matched"] for p in r["points"]],
            s=12,
            marker="x",
            label=f"{r['b']} (matched)",
        )
        ax.set_xlabel("accuracy on the task just trained (%)", fontsize=8)
        ax.set_ylabel("prior average (%)", fontsize=8)
        ax.set_title(f"{r['a']} vs {r['b']} at matched acquisition", fontsize=8)
        ax.legend(fontsize=7)
    return _save(fig, out, "acquisition_matched")


def attractor(data: dict, out: Path) -> str | None:
    fits = {m: f for m, f in data["attractor"].items() if m != "all" and f["points"]}
    if not fits:
        return None
    fig, ax = _single()
    colors = _colors(list(fits))
    for m, f in fits.items():
        xs, ys = [100 * _v(x) for x, _ in f["points"]], [100 * _v(y) for _, y in f["points"]]
        ax.scatter(xs, ys, color=colors[m], s=14, label=m)
        if f["slope"] is not None:
            grid = np.linspace(min(xs), max(xs), 10)
            ax.plot(grid, f["intercept"] * 100 + f["slope"] * grid, color=colors[m], lw=1)
    title = "Attractor check: BWT against how high stage 1 ended"
    _label(ax, "stage-1 accuracy on its task (%)", "BWT at the last stage (points)", title)
    return _save(fig, out, "attractor")


ALL = (matrices, fig3, pareto, pass_at_k, kl_vs_new, retention, drift, acquisition, attractor)


def draw_all(data: dict, out: Path) -> list[str]:
    """Every figure the data supports; their names (``figures/<name>.png`` and ``.svg``)."""
    return [name for draw in ALL if (name := draw(data, out)) is not None]
