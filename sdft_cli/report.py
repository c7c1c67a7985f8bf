"""The forgetting matrix as files (CSV, JSON, Markdown, PNG) and as a terminal table.

It is rewritten after every stage, so each writer copes with a partial matrix (rows that do not exist
yet are left out) and with G = 0 prior probes. Every file is written atomically, so a reader or a killed
run never sees half a file. The JSON is strict (NaN -> null) and is the source for the other views.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sdft_cli.artifacts import (
    RunLayout,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_complete,
    read_json,
    verified,
)
from sdft_cli.metrics import normalized, summarize

CSV_HEADER = "method,seed,stage,stage_task,eval_task,eval_kind,metric,value,stderr,n".split(",")
NORMALIZED_NOTE = (
    "N = (R - R_base) / (max over stages of this run - R_base), trained columns only; the max is over "
    "this run only, not across methods (SDFT Fig. 3 takes it across algorithms)"
)
# (key in metrics, label, note); notes state the conventions as docs/metrics.md asks.
METRIC_ROWS = [
    ("acc", "ACC", "mean of R[k, j], j <= k"),
    ("bwt", "BWT", "divisor k-1 = {d} (the T-1 form); negative = forgetting"),
    ("fwt", "FWT", "baseline: row 0 (base model), divisor k-1 = {d}"),
    ("forgetting_max", "Forgetting F_k", "Chaudhry: max over rows 1..k-1 minus row k"),
    ("aia", "AIA", "mean of stage accuracies A_1..A_k"),
    ("prior_avg", "Prior avg", "unweighted mean of prior columns at row k"),
    ("prior_avg_base", "Prior avg (base)", "same at row 0"),
    ("prior_delta", "Prior delta", "prior avg at row k minus row 0"),
    ("prior_forgetting", "Prior forgetting", "max over rows 0..k-1 minus row k, averaged"),
]


def _f(v: Any) -> float:
    return float("nan") if v is None else float(v)


def _json_safe(obj: Any) -> Any:
    """Recursively replace NaN/inf by None and numpy scalars by Python ones, for strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _select(cells: Iterable[dict], tasks: list[str], priors: list[str]) -> dict[tuple[int, int], dict]:
    """Map (stage, column) -> cell, one metric per eval_task: the one named by its first row."""
    col = {name: i for i, name in enumerate([*tasks, *priors])}
    primary: dict[str, str] = {}
    chosen: dict[tuple[int, int], dict] = {}
    for c in cells:
        task = c["eval_task"]
        if task not in col:
            continue  # not a matrix column; still listed in matrix.csv
        stage = int(c["stage"])
        if not 0 <= stage <= len(tasks):
            raise ValueError(f"cell for {task!r} has stage {stage}, outside 0..{len(tasks)}")
        if primary.setdefault(task, c["metric"]) == c["metric"]:
            chosen[(stage, col[task])] = c  # a repeated (stage, task, metric): the later row wins
    return chosen


def build_matrix(cells: list[dict], tasks: list[str], priors: list[str]) -> np.ndarray:
    """R with shape (T+1, T+G) for the full curriculum; NaN where no cell (or a None value) exists."""
    R = np.full((len(tasks) + 1, len(tasks) + len(priors)), np.nan)
    for (i, j), c in _select(cells, tasks, priors).items():
        R[i, j] = _f(c.get("value"))
    return R


def _csv_text(cells: list[dict], columns: list[str], meta: dict) -> str:
    order = {name: i for i, name in enumerate(columns)}
    rows = sorted(cells, key=lambda c: (int(c["stage"]), order.get(c["eval_task"], len(order))))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_HEADER)
    for c in rows:
        value, stderr = _json_safe(c.get("value")), _json_safe(c.get("stderr"))
        w.writerow(
            [
                meta.get("method", ""),
                meta.get("seed", ""),
                c["stage"],
                c["stage_task"],
                c["eval_task"],
                c["kind"],
                c["metric"],
                "" if value is None else value,
                "" if stderr is None else stderr,
                "" if c.get("n") is None else c["n"],
            ]
        )
    return buf.getvalue()


def _matrix_data(cells: list[dict], tasks: list[str], priors: list[str], meta: dict) -> tuple[dict, dict]:
    """(matrix.json content, metrics): rows up to the last stage with a cell, NaN as null in the JSON."""
    chosen = _select(cells, tasks, priors)
    k = max((i for i, _ in chosen), default=0)
    R, S = build_matrix(cells, tasks, priors), np.full((len(tasks) + 1, len(tasks) + len(priors)), np.nan)
    for (i, j), c in chosen.items():
        S[i, j] = _f(c.get("stderr"))
    metric_of = {c["eval_task"]: c["metric"] for c in chosen.values()}
    columns, metrics = [*tasks, *priors], summarize(R, len(tasks), stage=k)
    data = _json_safe(
        {
            "rows": ["base", *(f"{i}:{t}" for i, t in enumerate(meta.get("stages", tasks)[:k], start=1))],
            "columns": columns,
            "column_kinds": ["trained"] * len(tasks) + ["prior"] * len(priors),
            "column_metrics": [metric_of.get(name) for name in columns],
            "values": R[: k + 1],
            "stderr": S[: k + 1],
            "normalized": normalized(R, len(tasks))[: k + 1],
            "normalized_note": NORMALIZED_NOTE,
            "metrics": metrics,
            "bwt_divisor": "T-1",
            "fwt_baseline": "row 0 (base model)",
            "meta": meta,
        }
    )
    return data, metrics


def write_matrix(run_dir: Path, cells: list[dict], tasks: list[str], priors: list[str], meta: dict) -> dict:
    """Write matrix.{csv,png,md,json} into run_dir (each atomically) and return the metrics."""
    layout = RunLayout(Path(run_dir))
    data, metrics = _matrix_data(cells, tasks, priors, meta)
    atomic_write_text(layout.matrix("csv"), _csv_text(cells, data["columns"], meta))
    atomic_write_bytes(layout.matrix("png"), render_heatmap(data))
    atomic_write_text(layout.matrix("md"), render_markdown(data))
    atomic_write_json(layout.matrix("json"), data)
    return metrics


def rebuild_matrix(
    layout: RunLayout, tasks: list[str], priors: list[str], meta: dict, stages: list[str] | None = None
) -> dict:
    """The run's matrix from every complete evaluation stage (a corrupt one is left out and redone by
    the run), with each trained stage's KL to the base in the metadata; written, then returned as
    ``load_matrix`` reads it. ``stages``: the training stages' names when they are not the tasks (one
    ``joint`` stage)."""
    stages = stages or tasks
    dirs = [layout.base_eval()] + [layout.eval(i, n) for i, n in enumerate(stages, 1)]
    cells = [c for d in dirs if verified(d) for c in read_json(d / "results.json")]
    diags = {
        f"{i}:{n}": read_json(d / "diagnostics.json")
        for i, (n, d) in enumerate(zip(stages, dirs[1:], strict=True), start=1)
        if is_complete(d) and (d / "diagnostics.json").is_file()
    }
    kl = {
        # KL(base || model), RL's Razor's direction, and KL(model || base), the SDFT paper's Sec. 3.2
        "kl_to_base": {k: d["kl_to_base_token"] for k, d in diags.items()},
        "kl_model_base": {
            k: d["kl_model_base_token"] for k, d in diags.items() if "kl_model_base_token" in d
        },
    }
    write_matrix(layout.root, cells, tasks, priors, {**meta, **kl})
    return load_matrix(layout.root)


def load_matrix(run_dir: Path) -> dict:
    """Read run_dir/matrix.json as written by write_matrix."""
    path = RunLayout(Path(run_dir)).matrix("json")
    if not path.is_file():
        raise FileNotFoundError(f"no forgetting matrix at {path} (it is written after each evaluated stage)")
    return read_json(path)


# ----------------------------------------------------------------------------- views


def _n_tasks(data: dict) -> int:
    return sum(kind == "trained" for kind in data["column_kinds"])


def _headers(data: dict) -> list[str]:
    pairs = zip(data["columns"], data["column_kinds"], strict=True)
    return [c if kind == "trained" else f"prior:{c}" for c, kind in pairs]


def _row_labels(data: dict) -> list[str]:
    return ["base" if i == 0 else label.replace(":", ": ", 1) for i, label in enumerate(data["rows"])]


def _pct(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"


def _num(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.4f}"


def _metric_lines(data: dict) -> list[tuple[str, str, str]]:
    m, T = data["metrics"], _n_tasks(data)
    G, d = len(data["columns"]) - T, (m["stage"] - 1 if m["stage"] >= 2 else "–")
    return [
        (label, _num(m.get(key)), note.format(d=d))
        for key, label, note in METRIC_ROWS
        if G or "prior" not in key
    ]


def _title(data: dict) -> str:
    return str(data.get("meta", {}).get("title") or "Forgetting matrix")


def render_markdown(data: dict) -> str:
    """matrix.md: the matrix in % (diagonal bold, missing as –), then the metrics with their conventions."""
    T, k = _n_tasks(data), data["metrics"]["stage"]

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [
        f"# {esc(_title(data))}",
        "",
        "Accuracy in %. Row `base` = before training, row `i: task` = after training stage i; "
        "**bold** = diagonal R[i, i]; `–` = missing"
        + ("; `prior:` columns are prior-capability probes." if len(data["columns"]) > T else "."),
        "",
        "| stage | " + " | ".join(esc(h) for h in _headers(data)) + " |",
        "|---|" + "---:|" * len(data["columns"]),
    ]
    for i, (label, row) in enumerate(zip(_row_labels(data), data["values"], strict=True)):
        cells = [
            f"**{_pct(v)}**" if i >= 1 and j == i - 1 and j < T and v is not None else _pct(v)
            for j, v in enumerate(row)
        ]
        lines.append(f"| {esc(label)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Metrics (stage {k} of {T}; fractions, not %)",
        "",
        f"BWT divisor: {data['bwt_divisor']}; FWT baseline: {data['fwt_baseline']}.",
        "",
        "| metric | value | note |",
        "|---|---:|---|",
    ]
    lines += [f"| {label} | {value} | {note} |" for label, value, note in _metric_lines(data)]
    kl = data.get("meta", {}).get("kl_to_base") or {}
    if kl:
        lines += [
            "",
            "## KL to base (RL's Razor forgetting predictor)",
            "",
            "Forward KL(base || model) in nats per token, full vocabulary, on the model's greedy answers to"
            " the just-trained task's test prompts.",
            "",
            "| stage | KL |",
            "|---|---:|",
        ]
        lines += [f"| {esc(stage.replace(':', ': ', 1))} | {v:.4g} |" for stage, v in kl.items()]
    return "\n".join(lines) + "\n"


def print_matrix(data: dict, console: Console | None = None) -> None:
    """Print the matrix (accuracy %, diagonal bold, prior columns after a ║ spacer) and one metrics line."""
    console = console or Console()
    T, headers = _n_tasks(data), _headers(data)
    has_priors = len(headers) > T
    table = Table(title=Text(_title(data)), header_style="bold")  # Text: names are never parsed as markup
    table.add_column("stage", no_wrap=True)
    for h in headers[:T]:
        table.add_column(Text(h), justify="right")
    if has_priors:
        table.add_column("║", style="dim", justify="center")
        for h in headers[T:]:
            table.add_column(Text(h.removeprefix("prior:")), justify="right", header_style="bold magenta")
    for i, (label, row) in enumerate(zip(_row_labels(data), data["values"], strict=True)):
        cells = [Text(_pct(v), style="bold" if i >= 1 and j == i - 1 else "") for j, v in enumerate(row)]
        table.add_row(Text(label), *cells[:T], *([Text("║"), *cells[T:]] if has_priors else []))
    console.print(table)
    m = data["metrics"]
    parts = [f"stage {m['stage']}/{T}"] + [f"{label} {value}" for label, value, _ in _metric_lines(data)]
    console.print(" · ".join(parts), markup=False, highlight=False)
    console.print(
        f"(fractions; BWT/FWT divisor k-1, FWT baseline {data['fwt_baseline']}; full notes in matrix.md)",
        markup=False,
        highlight=False,
        style="dim",
    )


def render_heatmap(data: dict) -> bytes:
    """matrix.png as bytes: annotated heatmap, diagonal outlined, NaN grey, a line before the priors."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    T = _n_tasks(data)
    V = 100 * np.array(data["values"], dtype=float).reshape(len(data["rows"]), len(data["columns"]))
    n_rows, n_cols = V.shape
    fig = Figure(figsize=(2.2 + 1.1 * max(n_cols, 1), 1.6 + 0.55 * n_rows), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(_title(data))
    if n_cols == 0:
        ax.text(0.5, 0.5, "no columns", ha="center", va="center")
        ax.set_axis_off()
    else:
        cmap = colormaps["viridis"].with_extremes(bad="0.85")
        im = ax.imshow(np.ma.masked_invalid(V), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(V[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{V[i, j]:.1f}",
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if V[i, j] < 55 else "black",
                    )
                if i >= 1 and j == i - 1 and j < T:
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", lw=2.5))
        if 0 < T < n_cols:
            ax.axvline(T - 0.5, color="black", lw=3)
        ax.set_xticks(range(n_cols), _headers(data), rotation=30, ha="right")
        ax.set_yticks(range(n_rows), _row_labels(data))
        ax.set_xlabel("evaluated on" + (" (trained tasks | prior capabilities)" if T < n_cols else ""))
        ax.set_ylabel("after stage")
        fig.colorbar(im, ax=ax, label="accuracy (%)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()
