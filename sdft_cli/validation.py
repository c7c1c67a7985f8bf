"""Periodic evaluation during a task, and the choice of the checkpoint that ends it (``select``).

Every ``eval.every_steps`` optimizer steps and at the task's last step the student is scored greedily on
the task's validation split (and, as ``eval.periodic`` asks, every task's test split and the probes).
Each evaluation is one record in the task's ``validation.jsonl`` and in metrics.jsonl, naming where
that step's weights were written (a resumable checkpoint, the kept best, the final model, or none).
With ``select=best_val`` the weights of the best validation score so far are kept
(``checkpoints/best_step_N``: the student alone, hard links when a checkpoint was written at that step)
and end the task if no later step beats them; ties go to the earlier step, the one nearer the previous
model. Evaluations write no optimizer state of their own: resumable checkpoints keep their
``method.save_every`` cadence. The choice, its score and the last step's are written to
``selection.json`` and the stage manifest. The test split never takes part in the choice.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdft_cli import distributed
from sdft_cli.artifacts import atomic_dir, atomic_write_json, read_json, read_jsonl
from sdft_cli.engines.hf import inference_copy
from sdft_cli.evaluate import EvalContext, evaluate_many
from sdft_cli.logger import append_jsonl, rewind_jsonl
from sdft_cli.tasks import Task

RECORDS = "validation.jsonl"
SELECTION = "selection.json"
BEST = "best_step_"


@dataclass
class Periodic:
    """What a task's periodic evaluations score, and how the task's final checkpoint is chosen."""

    every: int
    select: str
    # the task being trained, whose validation rows decide ``select=best_val``
    task: Task
    evals: EvalContext
    # scored too: every task's test split, the probes (eval.periodic)
    tests: list[Task] = field(default_factory=list)
    probes: list[Task] = field(default_factory=list)
    # a directory with the model's architecture, for a vLLM evaluation engine that is not running yet
    source: Path | str | None = None
    # a sharded student's whole weights at the last evaluation (rank 0), for keeping them as the best
    gathered: dict | None = field(default=None, repr=False)
    # rank 0's whole (unsharded) copy of a sharded student, the model evaluations decode with
    _whole: torch.nn.Module | None = field(default=None, repr=False)

    @property
    def keeps_best(self) -> bool:
        return self.select == "best_val"

    def due(self, step: int, total: int) -> bool:
        return step == total or step % self.every == 0

    def evaluate(self, model: torch.nn.Module, *, stage: int, step: int) -> dict | None:
        """Score ``model`` as it is at ``step``; the record that ``validation.jsonl`` keeps. Every rank
        calls it; rank 0 evaluates (a sharded student's weights gathered into a whole copy) and the
        others get None."""
        parts = getattr(self.task, "parts", {self.task.name: self.task})  # a joint task: each task's rows
        val = [Task(name=n, cfg=t.cfg, test=t.val) for n, t in parts.items() if t.val]
        groups = {"val": val, "test": self.tests, "probes": self.probes}
        tasks = [t for g in groups.values() for t in g]
        training = model.training
        self.gathered = None
        if distributed.is_sharded(model):
            state = distributed.full_state(model)  # every rank takes part; rank 0 gets the weights
            if not distributed.current().main:
                return None
            if self._whole is None:  # loaded once per task: every evaluation refills it
                from sdft_cli.models import load_model

                dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
                self._whole = load_model(self.source, dtype, trust_remote_code=self.evals.trust_remote_code)
            distributed.load_full_state(self._whole, state)
            copy = inference_copy(self._whole, self.evals.dtype).eval()
            self.gathered = state
        else:
            model.eval()
            copy = inference_copy(model, self.evals.dtype)
        engine = self.evals.engines.for_eval(copy, backend=self.evals.cfg.backend, path=self.source)
        results = evaluate_many(
            engine,
            self.evals.tokenizer,
            tasks,
            batch_size=self.evals.cfg.batch_size,
            judge=self.evals.cfg.judge,
        )
        engine.release()
        del copy
        model.train(training)
        record: dict = {"stage": stage, "task": self.task.name, "step": step}
        for kind, group in groups.items():
            done, results = results[: len(group)], results[len(group) :]
            if group:
                record[kind] = {r.task: {"metric": r.metric, "value": r.value, "n": r.n} for r in done}
        return record


def val_score(record: dict) -> float | None:
    """The record's validation score of the task it trained (a joint stage: the mean over its tasks;
    None when it has none)."""
    val = record.get("val", {})
    if record["task"] in val:
        return float(val[record["task"]]["value"])
    return sum(float(c["value"]) for c in val.values()) / len(val) if val else None


def read_records(train_dir: Path) -> list[dict]:
    return read_jsonl(train_dir / RECORDS)


def best_record(records: list[dict]) -> dict | None:
    """The record with the highest validation score; among equal scores, the earliest step."""
    scored = [r for r in records if val_score(r) is not None]
    return max(scored, key=lambda r: (val_score(r), -r["step"]), default=None)


def _log(logger, record: dict) -> None:
    flat = {"stage": record["stage"], "task": record["task"], "step": record["step"], "event": "periodic"}
    for kind in ("val", "test", "probes"):
        for name, cell in record.get(kind, {}).items():
            flat[f"{kind}/{name}/{cell['metric']}"] = cell["value"]
    logger.log(flat)


def commit(
    periodic: Periodic,
    train_dir: Path,
    record: dict,
    model: torch.nn.Module,
    *,
    checkpoint: Path | None = None,
    last: bool = False,
    logger=None,
) -> None:
    """After an evaluation (and its step's checkpoint, when one was written): keep the weights of a new
    best, then append the record (rank 0). A crash before the record is appended re-runs the steps since
    the last checkpoint on resume, this evaluation included."""
    records = read_records(train_dir)
    best = best_record(records)
    score = val_score(record)
    record["best"] = score is not None and (best is None or score > val_score(best))
    kept = None
    if record["best"] and periodic.keeps_best and not last:
        root = train_dir / "checkpoints"
        if checkpoint is not None:
            kept = keep_weights(checkpoint / "model", root, record["step"])
        else:
            kept = save_weights(model, periodic.evals.tokenizer, root, record["step"], periodic.gathered)
    where = checkpoint or kept
    record["checkpoint"] = "model" if last else (where.name if where is not None else None)
    append_jsonl(train_dir / RECORDS, record)
    if logger is not None:
        _log(logger, record)


def _keep(root: Path, step: int, fill) -> Path:
    """``best_step_N`` written by ``fill(directory)`` (atomically), then the older best dropped."""
    out = root / f"{BEST}{step:06d}"
    with atomic_dir(out) as tmp:
        fill(tmp)
    for old in root.glob(f"{BEST}*"):
        if old != out:
            shutil.rmtree(old, ignore_errors=True)
    return out


def save_weights(model: torch.nn.Module, tokenizer, root: Path, step: int, state: dict | None = None) -> Path:
    """The student's weights alone (no optimizer or teacher state) as ``best_step_N``; ``state``: a
    sharded student's gathered weights."""
    from sdft_cli.checkpoint import save_model

    return _keep(root, step, lambda tmp: save_model(tmp, model, tokenizer, state))


def keep_weights(model_dir: Path, root: Path, step: int) -> Path:
    """Hard-link a checkpoint's model files into ``best_step_N`` (no copy; they outlive the checkpoint's
    pruning), then drop the older best."""

    def link(tmp: Path) -> None:
        for p in model_dir.iterdir():
            if p.is_file():
                try:
                    os.link(p, tmp / p.name)
                except OSError:  # a filesystem without hard links
                    shutil.copy2(p, tmp / p.name)

    return _keep(root, step, link)


def kept_weights(root: Path) -> tuple[int, Path] | None:
    found = sorted(root.glob(f"{BEST}*")) if root.is_dir() else []
    return (int(found[-1].name.removeprefix(BEST)), found[-1]) if found else None


def rewind(train_dir: Path, step: int) -> None:
    """A task resumed at ``step``: records after it are about to be recomputed, and best weights from
    after it (a checkpoint that turned out corrupt) are dropped."""
    rewind_jsonl(train_dir / RECORDS, lambda r: r.get("step", 0) <= step)
    kept = kept_weights(train_dir / "checkpoints")
    if kept is not None and kept[0] > step:
        shutil.rmtree(kept[1], ignore_errors=True)


def select(periodic: Periodic, train_dir: Path, last_step: int) -> dict:
    """Choose the weights that end the task and write ``selection.json``; returns that record, whose
    ``weights`` names the kept directory under ``checkpoints/`` to load, or ``last``."""
    records = read_records(train_dir)
    last = next((r for r in reversed(records) if r["step"] == last_step), None)
    best = best_record(records)
    out: dict = {"rule": periodic.select, "last_step": last_step}
    if last is not None and val_score(last) is not None:
        out["last_val"] = val_score(last)
    if best is not None:
        out["metric"] = next(iter(best["val"].values()))["metric"]
    if periodic.select == "last" or best is None or best["step"] == last_step:
        why = (
            "select=last"
            if periodic.select == "last"
            else "the last step scored highest on validation (ties go to the earlier step)"
        )
        out.update(step=last_step, weights="last", why=why)
        if best is not None and periodic.select == "last":
            out["best_val_step"], out["best_val"] = best["step"], val_score(best)
    else:
        kept = kept_weights(train_dir / "checkpoints")
        if kept is None or kept[0] != best["step"]:
            out.update(step=last_step, weights="last")
            out["why"] = f"step {best['step']} scored highest but its weights are gone (resumed past it)"
        else:
            out.update(step=best["step"], weights=kept[1].name, val=val_score(best))
            out["why"] = (
                f"highest validation {out['metric']} ({val_score(best):.4f}) of {len(records)} evaluations; "
                f"the last step scored {out.get('last_val', float('nan')):.4f}"
            )
    if best is not None and "val" not in out:  # the last step's weights end the task
        out["val"] = out.get("last_val")
    atomic_write_json(train_dir / SELECTION, out)
    return out


def load_selected(model: torch.nn.Module, train_dir: Path, chosen: dict, trust_remote_code: bool) -> None:
    """Load the chosen kept weights into ``model`` (sharded or not; every rank calls it)."""
    if chosen["weights"] == "last":
        return
    from sdft_cli.models import load_model

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    kept = load_model(
        train_dir / "checkpoints" / chosen["weights"], dtype, trust_remote_code=trust_remote_code
    )
    distributed.load_full_state(model, kept.state_dict())


def read_selection(train_dir: Path) -> dict | None:
    path = train_dir / SELECTION
    return read_json(path) if path.is_file() else None
