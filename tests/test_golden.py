"""Golden losses: a handful of SDFT and SFT steps on the fixed-seed tiny model, each step's logged loss
pinned to the value computed once (torch 2.13.0 CPU, fp32, greedy rollouts).

A change that alters any number the training loop computes (masks, weights, the divergence, the fused
loss, the EMA, the optimizer, the batch order, the contexts) moves these values; a refactor that only
moves code does not. After an intended change of results, print the new values with
``python tests/test_golden.py`` and say in the commit why they moved.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

STEPS = 4
# method -> train/loss of steps 1..STEPS (metrics.jsonl, rounded to 6 decimals as logged)
GOLDEN = {
    "sdft": [0.001998, 0.007564, 0.00329, 0.002],
    "sft": [5.614095, 5.436662, 5.325428, 5.155373],
}


def losses(method: str, model, tok, task_dir: Path, out: Path) -> list[float]:
    """Train the tiny model on the copy task for STEPS steps with ``method``; the logged losses."""
    from conftest import train_context

    from sdft_cli.artifacts import RunLayout
    from sdft_cli.config import RolloutConfig, TaskConfig
    from sdft_cli.methods import METHODS
    from sdft_cli.tasks import load_task

    cfg = METHODS[method].schema(
        prompts_per_step=2, micro_batch_size=1, max_steps=STEPS, loss_chunk_size=5, save_every=0
    )
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
    rollout = RolloutConfig(dtype="float32", temperature=0.0, max_new_tokens=6)
    task = load_task("copy", TaskConfig(source="json", path=str(task_dir), max_new_tokens=6))
    layout = RunLayout(out)
    METHODS[method].train(train_context(copy.deepcopy(model), tok, cfg, layout, rollout=rollout), task)
    records = [json.loads(line) for line in layout.metrics_log.read_text().splitlines()]
    return [r["train/loss"] for r in records if "step" in r]


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_losses_equal_the_pinned_values(method, tiny_model, copy_task_dir, tmp_path):
    model, tok = tiny_model
    got = losses(method, model, tok, copy_task_dir, tmp_path)
    assert got == pytest.approx(GOLDEN[method], rel=1e-4, abs=2e-6), got  # abs: the log's 6 decimals
    assert len(set(got)) > 1  # the steps differ: the model and the batches move


if __name__ == "__main__":  # print the values to pin
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_jsonl

    from sdft_cli.artifacts import cache_dir
    from sdft_cli.builders import build_tiny_model
    from sdft_cli.config import TinyModelConfig
    from sdft_cli.models import load_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["SDFT_CACHE"] = tmp
        path = build_tiny_model(cache_dir() / "models" / "tiny-test", TinyModelConfig(seed=0))
        model, tok = load_model(path), load_tokenizer(path)
        words = ["apple", "river", "stone", "cloud", "amber", "tiger", "maple", "ocean"]
        rows = [{"prompt": f"Repeat: {w}", "demonstration": w, "answer": w} for w in words]
        write_jsonl(Path(tmp) / "copy" / "train.jsonl", rows[:6])
        write_jsonl(Path(tmp) / "copy" / "test.jsonl", rows[6:])
        for method in GOLDEN:
            print(method, losses(method, model, tok, Path(tmp) / "copy", Path(tmp) / method))
