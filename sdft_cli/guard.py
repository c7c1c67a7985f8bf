"""Numerical faults: a step whose loss or gradient is NaN/inf is caught before the optimizer, the EMA
teacher or any file sees it, and no checkpoint or model holding NaN/inf is ever written.

``method.optim.on_nonfinite`` chooses between stopping (the default) and skipping the step, up to
``method.optim.max_nonfinite_skips`` in a row. The per-step check is one ``isfinite`` on the loss and on
the gradient norm that clipping computed, reduced over ranks so every rank acts alike.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sdft_cli import distributed
from sdft_cli.config import OptimConfig
from sdft_cli.errors import SdftError
from sdft_cli.schedule import TrainState


class NonFiniteError(SdftError):
    """A step's loss or gradient is NaN/inf (``on_nonfinite=stop``, or too many consecutive skips), or a
    state about to be saved holds NaN/inf; the message names the task, step and rows, or the tensor."""


def check_step(
    cfg: OptimConfig, state: TrainState, *, loss: float, grad_norm, where: dict, rows: list[int], logger=None
) -> bool:
    """Whether the step about to be applied (``state.step + 1``) is finite on every rank.

    One check of the step's loss and of the total gradient norm (clipping computed it), and one flag
    reduced over ranks, so all ranks stop or skip together. A non-finite step is logged; with
    ``on_nonfinite=skip`` it is counted in ``state`` and False is returned (the caller leaves the
    weights, optimizer and teacher alone), otherwise ``NonFiniteError`` is raised before anything
    else is written. ``where``: stage, task and logged step; ``rows``: the row indices to name.
    """
    norm = distributed.scalar(grad_norm)
    if not distributed.any_rank(not (math.isfinite(loss) and math.isfinite(norm))):
        state.skip_streak = 0
        return True
    step = where.get("step", state.step + 1)
    skip = cfg.on_nonfinite == "skip" and state.skip_streak < cfg.max_nonfinite_skips
    what = (
        f"stage {where.get('stage')} (task {where.get('task')}): step {step} has a non-finite loss ({loss}) "
        f"or gradient norm ({norm}) on rows {sorted(rows)}"
    )
    if logger is not None and distributed.current().main:
        action = "skip" if skip else "stop"
        # no "step" key: the step's own record (if it is skipped) is the one that counts as a step
        at = {k: v for k, v in where.items() if k != "step"}
        logger.log({**at, "event": "nonfinite", "at_step": step, "rows": sorted(rows), "action": action})
    if not skip:
        why = (
            f"after {state.skip_streak} consecutive skipped steps, method.optim.max_nonfinite_skips"
            if cfg.on_nonfinite == "skip"
            else "method.optim.on_nonfinite=stop"
        )
        raise NonFiniteError(f"{what}; stopping ({why}): the step was neither applied nor saved")
    state.skipped.append(step)
    state.skip_streak += 1
    print(f"[sdft] {what}: skipped ({len(state.skipped)} so far)", flush=True)
    return False


def _nonfinite(tree, prefix: str = "") -> str | None:
    """The name of the first floating tensor in a nested dict/list that holds NaN/inf (save time only)."""
    if isinstance(tree, torch.Tensor):
        bad = tree.is_floating_point() and not bool(torch.isfinite(tree).all())
        return (prefix or "tensor") if bad else None
    items = (
        tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    )
    for k, v in items:
        if (bad := _nonfinite(v, f"{prefix}.{k}" if prefix else str(k))) is not None:
            return bad
    return None


def ensure_finite(path: Path, **trees) -> None:
    """Refuse to write ``path`` when a weight or optimizer value is NaN/inf (every rank agrees)."""
    bad = next((f"{name}: {b}" for name, t in trees.items() if (b := _nonfinite(t)) is not None), None)
    if distributed.any_rank(bad is not None):
        raise NonFiniteError(f"not writing {path}: {bad or 'another rank'} holds NaN/inf")
