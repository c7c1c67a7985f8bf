"""``sdft report DIR``: the continual-learning report of a run or a sweep.

``sweep.py`` reads the runs and groups them, ``build.py`` and ``paired.py`` compute every number into
``report.json`` (with ``stats.py``), ``figures.py`` draws the figures from those numbers, ``page.py``
writes ``report.html`` (self-contained) and ``report.md``. docs/report.md describes each part.
"""

from __future__ import annotations

from pathlib import Path

from sdft_cli.artifacts import atomic_write_json, atomic_write_text


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.html``, ``report.md``, ``report.json`` and ``figures/`` for the runs below
    ``root`` (into ``out``, default ``root``); returns the HTML's path."""
    from sdft_cli.analysis import figures, page
    from sdft_cli.analysis.build import build
    from sdft_cli.analysis.sweep import load_sweep
    from sdft_cli.report import _json_safe

    sweep = load_sweep(root)
    out = Path(out) if out is not None else Path(root)
    data = _json_safe(build(sweep))
    fig_dir = out / "figures"
    drawn = figures.draw_all(data, fig_dir)
    atomic_write_json(out / "report.json", {**data, "figures": drawn})
    atomic_write_text(out / "report.md", page.render_markdown(data, drawn))
    return atomic_write_text(out / "report.html", page.render_html(data, drawn, fig_dir))


def log_to_wandb(
    report_dir: str | Path, project: str, entity: str | None = None, mode: str | None = None
) -> str:
    """The report's figures (as images), its page (as HTML) and headline numbers in one W&B run of the
    sweep (``job_type=report``, named after the directory); returns the run's directory."""
    import json
    import os

    import wandb

    report_dir = Path(report_dir)
    data = json.loads((report_dir / "report.json").read_text())
    run = wandb.init(
        project=project,
        entity=entity,
        name=f"{report_dir.name}-report",
        job_type="report",
        dir=str(report_dir),
        mode=mode or os.environ.get("WANDB_MODE") or "online",
        config={"root": data["root"], "tasks": data["tasks"], "priors": data["priors"]},
    )
    logged: dict = {
        f"report/{n}": wandb.Image(str(report_dir / "figures" / f"{n}.png")) for n in data["figures"]
    }
    logged["report/page"] = wandb.Html((report_dir / "report.html").read_text())
    run.log(logged)
    for label, g in data["groups"].items():
        for metric, m in g["metrics"].items():
            if m["mean"] is not None:
                run.summary[f"{label}/{metric}"] = m["mean"]
    out = run.dir
    run.finish()
    return out
