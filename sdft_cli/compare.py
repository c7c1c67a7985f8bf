"""Compare the runs of a sweep: methods side by side, mean and 95% confidence interval over seeds.

Runs are found under a sweep directory by their ``matrix.json``; runs whose Hydra overrides agree
apart from ``seed`` form one group (one method, or one method at one learning rate). The interval is
Student's t over seeds, as the SDFT paper reports its 3 seeds (App. B.2). Called by Hydra at the end
of a multirun (``CompareCallback``) and by ``sdft compare DIR``.

Selection (the paper reports "the model achieving the highest validation performance"): a run's
validation score is the mean over its tasks of the validation score of the checkpoint that ended each
task (``selection.json``, written when ``eval.every_steps`` evaluated on validation); among the groups
of one method, the one with the highest mean over seeds is selected, and its test figures are the ones
to report. Test scores never enter the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from sdft_cli import metrics as M
from sdft_cli.analysis import stats
from sdft_cli.analysis.sweep import validation_scores
from sdft_cli.artifacts import atomic_write_json, atomic_write_text, read_json
from sdft_cli.errors import RunDirError

# Seed-like overrides that do not split groups.
SEED_KEYS = ("seed",)


@dataclass
class RunRecord:
    path: Path
    seed: int
    data: dict
    preconditions: dict | None
    # the validation score of the checkpoint that ended each task, by task (selection.json)
    val: dict[str, float] = field(default_factory=dict)

    @property
    def val_score(self) -> float:
        """The mean over trained tasks of their validation scores (NaN when a task has none)."""
        tasks = self.data["columns"][: self.n_tasks]
        if not tasks or any(t not in self.val for t in tasks):
            return float("nan")
        return float(np.mean([self.val[t] for t in tasks]))

    @property
    def n_tasks(self) -> int:
        return self.data["column_kinds"].count("trained")

    @property
    def R(self) -> np.ndarray:
        """Rows 0..T, NaN rows for stages a running or stopped run has not evaluated."""
        return M.full_rows(self.data["values"], self.n_tasks, len(self.data["columns"]))

    @property
    def finished(self) -> bool:
        return M.last_stage(self.R) == self.n_tasks


@dataclass
class Group:
    label: str
    runs: list[RunRecord] = field(default_factory=list)


def mean_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float, int]:
    """(mean, half-width of the two-sided Student-t interval, n); NaN for what is undefined."""
    m = stats.mean_ci(values, confidence)
    nan = float("nan")
    return (nan if m["mean"] is None else m["mean"]), (nan if m["ci"] is None else m["ci"]), m["n"]


def _overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in yaml.safe_load(path.read_text()) or []]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _labels(overrides: dict[Path, list[str]]) -> dict[Path, str]:
    """Each run's group label: its overrides apart from the seed, shortened to the keys whose values
    differ between runs (a sweep's fixed settings would repeat in every label)."""
    kept = {p: sorted(o for o in ov if _key(o) not in SEED_KEYS) for p, ov in overrides.items()}
    values: dict[str, set[str]] = {}
    for ov in kept.values():
        for o in ov:
            values.setdefault(_key(o), set()).add(o)
    keys = {p: {_key(o) for o in ov} for p, ov in kept.items()}
    varying = {k for k, v in values.items() if len(v) > 1 or any(k not in ks for ks in keys.values())}
    return {p: ",".join(o for o in ov if _key(o) in varying) for p, ov in kept.items()}


def collect(sweep_dir: str | Path) -> list[Group]:
    """Every finished-or-partial run below ``sweep_dir``, grouped by its overrides without the seed."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise RunDirError(f"{root}: no such directory")
    groups: dict[str, Group] = {}
    dirs = [m.parent for m in sorted(root.rglob("matrix.json"))]
    labels = _labels({d: _overrides(d) for d in dirs})
    for run_dir in dirs:
        data = read_json(run_dir / "matrix.json")
        pre = run_dir / "t00_base" / "preconditions" / "preconditions.json"
        label = labels[run_dir] or f"method={data['meta'].get('method', '?')}"
        rec = RunRecord(
            run_dir, int(data["meta"].get("seed", 0)), data, read_json(pre) if pre.is_file() else None
        )
        rec.val = validation_scores(run_dir)
        groups.setdefault(label, Group(label)).runs.append(rec)
    if not groups:
        raise RunDirError(f"{root}: no runs (no matrix.json below it)")
    return list(groups.values())


def _family(label: str, rec: RunRecord) -> str:
    """The method a group belongs to: what selection chooses among (its other overrides)."""
    for part in label.split(","):
        if part.startswith("method="):
            return part
    return f"method={rec.data['meta'].get('method', '?')}"


def select_on_validation(groups: list[Group]) -> dict:
    """Per method, the group with the highest mean validation score over its seeds (a group lacking a
    validation score for any run cannot be chosen); ties go to the first group in label order."""
    candidates: dict[str, dict[str, float | None]] = {}
    for g in sorted(groups, key=lambda g: g.label):
        scores = [r.val_score for r in g.runs]
        ok = scores and not any(math.isnan(x) for x in scores)
        candidates.setdefault(_family(g.label, g.runs[0]), {})[g.label] = (
            float(np.mean(scores)) if ok else None
        )
    return stats.best_per_method(candidates)


def run_figures(rec: RunRecord) -> dict:
    """One run's headline numbers at its last finished stage."""
    R, T = rec.R, rec.n_tasks
    k = M.last_stage(R)
    kl = rec.data["meta"].get("kl_to_base", {})
    return {
        "stage": k,
        "new_task": float(np.mean([R[j, j - 1] for j in range(1, k + 1)])) if k else float("nan"),
        "acc": M.acc(R, T, k),
        "bwt": M.bwt(R, T, k),
        "prior_avg": M.prior_avg(R, T, k),
        "prior_delta": M.prior_delta(R, T, k),
        "kl_to_base": float(np.mean(list(kl.values()))) if kl else float("nan"),
    }


HEADLINE = (
    ("new_task", "new task (just trained)", 100),
    ("acc", "ACC (final)", 100),
    ("bwt", "BWT", 100),
    ("prior_avg", "prior avg (final)", 100),
    ("prior_delta", "prior delta", 100),
    ("kl_to_base", "KL from base (nats/token)", 1),
)


def summarize(groups: list[Group]) -> dict:
    """Numbers of the report (mean, ci95, n for each figure), JSON-ready."""
    out: dict = {"groups": {}, "preconditions": None}
    for g in groups:
        # the final figures come from finished runs only: a run stopped at stage 2 of 3 would mix its
        # stage-2 ACC into a stage-3 mean; its finished stages still count in the per-stage table
        figs = [run_figures(r) for r in g.runs if r.finished]
        first = g.runs[0]
        T = first.n_tasks
        tasks = first.data["columns"][:T]
        head = {key: mean_ci([f[key] for f in figs]) for key, _, _ in HEADLINE}
        stages = []
        for j in range(0, T + 1):
            rows = [r.R for r in g.runs if M.last_stage(r.R) >= j]
            stages.append(
                {
                    "stage": j,
                    "task": tasks[j - 1] if j else "base",
                    "task_acc": mean_ci([R[j, j - 1] for R in rows]) if j else None,
                    "prior_avg": mean_ci([M.prior_avg(R, T, j) for R in rows]),
                    **{
                        key: mean_ci(
                            [r.data["meta"].get(key, {}).get(f"{j}:{tasks[j - 1]}") for r in g.runs]
                            if j
                            else []
                        )
                        for key in ("kl_to_base", "kl_model_base")
                    },
                }
            )
        out["groups"][g.label] = {
            "runs": [str(r.path) for r in g.runs],
            "seeds": sorted(r.seed for r in g.runs),
            "unfinished": [
                {"seed": r.seed, "stage": M.last_stage(r.R), "of": r.n_tasks, "run": str(r.path)}
                for r in g.runs
                if not r.finished
            ],
            "val": mean_ci([r.val_score for r in g.runs]),
            "tasks": tasks,
            "headline": head,
            "stages": stages,
        }
    if any(r.val for g in groups for r in g.runs):
        out["selection"] = select_on_validation(groups)
    pre = [r.preconditions for g in groups for r in g.runs if r.preconditions]
    if pre:
        out["preconditions"] = {
            task: {
                key: mean_ci([p[task].get(key) for p in pre if task in p])
                for key in ("student", "teacher", "teacher_kl_to_base_token", "teacher_kl_model_base_token")
            }
            for task in pre[0]
        }
    return out


def _fmt(m: tuple, scale: float) -> str:
    mean, half, n = m
    if n == 0 or math.isnan(mean):
        return "–"
    digits = 1 if scale == 100 else 3
    if math.isnan(half):
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {half * scale:.{digits}f}"


def render_markdown(summary: dict, title: str = "Comparison") -> str:
    groups = summary["groups"]
    lines = [f"# {title}", ""]
    lines.append(
        "Mean ± half-width of the 95% Student-t interval over seeds; accuracies in %. "
        '"new task (just trained)" is the mean over tasks of R[j, j], the accuracy on task j right after '
        'training on it; ACC and BWT follow docs/metrics.md; "prior" columns average the '
        "prior-capability probes; KL from base is KL(pi_0 || pi) per token on the model's own greedy "
        "completions of the task just trained, averaged over stages."
    )
    lines += ["", "| group | seeds | " + " | ".join(h for _, h, _ in HEADLINE) + " |"]
    lines.append("|---|---|" + "---|" * len(HEADLINE))
    for label, g in groups.items():
        cells = [_fmt(g["headline"][k], s) for k, _, s in HEADLINE]
        lines.append(f"| {label} | {len(g['seeds']) - len(g['unfinished'])} | " + " | ".join(cells) + " |")
    unfinished = [(label, u) for label, g in groups.items() for u in g["unfinished"]]
    if unfinished:
        lines += [
            "",
            "Not finished (running or stopped), left out of the table above; their finished stages are "
            "in the per-stage table: "
            + "; ".join(
                f"{label} seed {u['seed']} at stage {u['stage']} of {u['of']}" for label, u in unfinished
            )
            + ".",
        ]
    selection = summary.get("selection")
    if selection:
        lines += ["", "## Selected on validation", ""]
        lines.append(
            "Per method, the settings with the highest validation score (mean over seeds of the mean over "
            "tasks of the validation score of the checkpoint that ended each task); report the test figures "
            "of that row above. Test scores take no part in the choice."
        )
        lines += ["", "| method | selected | validation % | candidates (validation %) |", "|---|---|---|---|"]
        for family, sel in selection.items():
            pct = {label: "–" if v is None else f"{v * 100:.1f}" for label, v in sel["candidates"].items()}
            cands = "; ".join(f"{label or '–'}: {v}" for label, v in pct.items())
            chosen = sel["selected"] if sel["selected"] is not None else "none (no validation scores)"
            val = "–" if sel["val"] is None else f"{sel['val'] * 100:.1f}"
            lines.append(f"| {family} | {chosen} | {val} | {cands} |")
    lines += ["", "## Per stage", ""]
    lines.append("| group | stage | task acc (just trained) | prior avg | KL from base |")
    lines.append("|---|---|---|---|---|")
    for label, g in groups.items():
        for st in g["stages"]:
            task_acc = _fmt(st["task_acc"], 100) if st["task_acc"] else "–"
            lines.append(
                f"| {label} | {st['stage']}: {st['task']} | {task_acc} | {_fmt(st['prior_avg'], 100)} | "
                f"{_fmt(st['kl_to_base'], 1)} |"
            )
    pre = summary.get("preconditions")
    if pre:
        lines += ["", "## Preconditions (paper Sec. 3.2), base model", ""]
        lines.append(
            "Accuracy of the base model's student context (prompt alone) and teacher context (prompt + "
            "demonstration); then the KL from the base per token, KL(pi ‖ pi_0) as the paper's Sec. 3.2 "
            "and KL(pi_0 ‖ pi) as RL's Razor, for the teacher (on its greedy completions) and for each "
            "group's model right after training on the task (on its own greedy completions)."
        )
        for key, name in (("kl_model_base", "KL(π ‖ π0)"), ("kl_to_base", "KL(π0 ‖ π)")):
            lines += [
                "",
                f"| task | student % | teacher % | {name}: teacher | "
                + " | ".join(f"{name}: {label}" for label in groups)
                + " |",
            ]
            lines.append("|---|---|---|---|" + "---|" * len(groups))
            for task, p in pre.items():
                kls = []
                for g in groups.values():
                    st = next((s for s in g["stages"] if s["task"] == task), None)
                    kls.append(_fmt(st[key], 1) if st else "–")
                lines.append(
                    f"| {task} | {_fmt(p['student'], 100)} | {_fmt(p['teacher'], 100)} | "
                    f"{_fmt(p[f'teacher_{key}_token'], 1)} | " + " | ".join(kls) + " |"
                )
    lines += ["", "Runs:", ""]
    for label, g in groups.items():
        lines.append(f"- {label}: seeds {', '.join(map(str, g['seeds']))}")
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: str | Path, title: str | None = None) -> Path:
    """Write ``comparison.md`` and ``comparison.json`` into ``sweep_dir``; returns the markdown path."""
    root = Path(sweep_dir)
    summary = summarize(collect(root))
    atomic_write_json(root / "comparison.json", summary)
    return atomic_write_text(
        root / "comparison.md", render_markdown(summary, title or f"Comparison: {root.name}")
    )


try:  # Hydra is a dependency; the callback class exists wherever `sdft run` does
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]


class CompareCallback(Callback):  # type: ignore[misc]
    """Hydra callback: after a multirun, write the comparison and the continual-learning report
    (``sdft report``) into the sweep directory; with ``logger=wandb`` the report also goes to W&B."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from sdft_cli.analysis import log_to_wandb
        from sdft_cli.analysis import write_report as write_page

        sweep = config.hydra.sweep.dir
        path = write_report(sweep, title=f"Comparison: {config.name}")
        print(path.read_text(), flush=True)
        print(f"[sdft] comparison report: {path}", flush=True)
        page = write_page(sweep)
        print(f"[sdft] report: {page}", flush=True)
        if config.logger.name == "wandb":
            log_to_wandb(sweep, config.logger.project, config.logger.entity, config.logger.mode)
