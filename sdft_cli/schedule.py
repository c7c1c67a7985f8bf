"""How a task's training is laid out in steps: the step count, each step's prompt batch, each step's
sampling seed, and the optimizer with its learning-rate schedule.

Batches and seeds are pure functions of (seed, stage, step), so a resumed run sees exactly the batches
and random streams it would have seen uninterrupted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from sdft_cli import distributed, optim
from sdft_cli.config import MethodConfig, OptimConfig


@dataclass
class TrainState:
    """Where a task's training is: the next step to run, and the steps skipped for non-finite values."""

    step: int = 0
    total_steps: int = 0
    # steps skipped for a non-finite loss or gradient (on_nonfinite=skip), and how many in a row
    skipped: list[int] = field(default_factory=list)
    skip_streak: int = 0


def steps_per_task(cfg: MethodConfig, n_train: int) -> int:
    steps = math.ceil(cfg.epochs * n_train / cfg.prompts_per_step)
    return max(1, min(steps, cfg.max_steps) if cfg.max_steps else steps)


def batch_indices(n: int, batch: int, step: int, seed: int | tuple[int, ...]) -> list[int]:
    """Row indices for ``step``: consecutive slices of a fresh seeded permutation per epoch.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have seen.
    """
    out: list[int] = []
    start = step * batch
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        key = list(seed) if isinstance(seed, tuple) else [seed]
        perm = np.random.default_rng([*key, epoch]).permutation(n)
        out.extend(int(i) for i in perm[offset : offset + batch - len(out)])
    return out


def step_seed(seed: int, task_index: int, step: int, rank: int = 0) -> int:
    """The RNG seed for one optimizer step's sampling (stable under resume; its own stream per rank)."""
    key = [seed, task_index, step] + ([rank] if rank else [])
    return int(np.random.default_rng(key).integers(2**31 - 1))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, total_steps: int, per_tensor: bool = False):
    """AdamW over the trainable parameters and the schedule; ``per_tensor``: our per-tensor AdamW, whose
    ``on_update`` hook an offset teacher needs (``optim.py``)."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    # one fused kernel per tensor (CPU and CUDA): ~4x faster than the per-tensor loop on a CPU; sharded
    # (DTensor) parameters take torch's default implementation
    fused = not distributed.current().enabled and all(p.device.type in ("cpu", "cuda") for p in params)
    opt = optim.adamw(params, cfg, per_tensor=per_tensor) or torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
    )
    name = {"cosine": "cosine", "constant": "constant_with_warmup", "linear": "linear"}[cfg.schedule]
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total_steps)
    return opt, sched
