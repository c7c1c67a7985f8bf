"""A fixed set of teacher outputs for one task (the paper's Fig. 6 baselines).

Before the task's first step, the demonstration-conditioned teacher (the weights the task starts from)
samples ``per_prompt`` completions of every training prompt once. Offline distillation with
``method.teacher_samples=fixed`` distils the teacher's distributions on these completions, and
``method=sft_teacher`` imitates them with the NLL; both train on the same set for all their epochs,
where on-policy SDFT samples anew every step. The set is a stage artifact
(``train/teacher_set/``, complete when its manifest exists), so a resumed task trains on the same one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sdft_cli import distributed
from sdft_cli.artifacts import atomic_dir, read_jsonl, read_manifest, verified, write_manifest
from sdft_cli.rollout import Rollouts, Sampling
from sdft_cli.schedule import step_seed

DIR = "teacher_set"
FILE = "completions.jsonl"
# the sampling stream of the set: a step index no training step uses
SEED_STEP = 2**32 - 1


@dataclass
class TeacherSet:
    """Completions in prompt order: entry ``i * per_prompt + k`` is sample ``k`` of training row ``i``."""

    per_prompt: int
    completions: list[list[int]]  # token ids through the first EOS (or the length cap)
    truncated: list[bool]
    texts: list[str]

    def rollouts(self, rows: list[int], samples: list[int], pad_id: int) -> Rollouts:
        """The entries (row, sample) as ``Rollouts``, right-padded like an engine's."""
        picked = [r * self.per_prompt + k for r, k in zip(rows, samples, strict=True)]
        width = max(1, max(len(self.completions[j]) for j in picked))
        ids = torch.full((len(picked), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(picked), width), dtype=torch.long)
        for n, j in enumerate(picked):
            seq = self.completions[j]
            ids[n, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[n, : len(seq)] = 1
        return Rollouts([], ids, mask, [self.texts[j] for j in picked], [self.truncated[j] for j in picked])


def path(train_dir: Path) -> Path:
    return train_dir / DIR


def build(
    train_dir: Path,
    make_engine: Callable[[], object],
    sampler: torch.nn.Module,
    contexts: list[list[int]],
    sampling: Sampling,
    *,
    per_prompt: int,
    seed: int,
    stage: int,
) -> TeacherSet:
    """The task's set: loaded when complete, else sampled from ``sampler`` on ``contexts`` (the teacher
    contexts of the training rows) by the engine ``make_engine`` builds (only then) and written (rank 0;
    every rank reads the same file)."""
    out = path(train_dir)
    dist = distributed.current()
    if not distributed.from_main(dist.main and verified(out)):
        if dist.main:  # before sharding: the sampler's weights are whole on every rank
            _sample(
                out, make_engine(), sampler, contexts, sampling, per_prompt, step_seed(seed, stage, SEED_STEP)
            )
        distributed.barrier()
    return load(out)


def _sample(out: Path, engine, sampler, contexts, sampling: Sampling, per_prompt: int, seed: int) -> None:
    prompts = [c for c in contexts for _ in range(per_prompt)]
    torch.manual_seed(seed)
    engine.push(sampler)
    ro = engine.generate(prompts, sampling)
    engine.release()
    with atomic_dir(out) as tmp:
        with open(tmp / FILE, "w", encoding="utf-8") as f:
            for n, (ids, m) in enumerate(zip(ro.completion_ids, ro.completion_mask, strict=True)):
                row = {"row": n // per_prompt, "sample": n % per_prompt, "text": ro.texts[n]}
                row.update(ids=ids[: int(m.sum())].tolist(), truncated=ro.truncated[n])
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        info = {"generations": len(prompts), "per_prompt": per_prompt}
        info.update(temperature=sampling.temperature, max_new_tokens=sampling.max_new_tokens)
        write_manifest(tmp, info)


def load(out: Path) -> TeacherSet:
    per_prompt = int(read_manifest(out)["per_prompt"])
    rows = read_jsonl(out / FILE)
    return TeacherSet(
        per_prompt,
        [r["ids"] for r in rows],
        [bool(r["truncated"]) for r in rows],
        [r["text"] for r in rows],
    )
