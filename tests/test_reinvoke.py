"""method=sft_reinvoke: SFT, then on-policy distillation from the base model on general prompts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import SMOKE, sdft, write_jsonl

from sdft_cli.compose import compose
from sdft_cli.config import SFTReinvokeConfig
from sdft_cli.errors import ConfigError
from sdft_cli.methods.reinvoke import phase_configs
from sdft_cli.schedule import steps_per_task
from sdft_cli.teacher import Teacher

RUN = [*SMOKE, "method=sft_reinvoke", "task=[facts]", "method.optim.lr=3e-3", "method.reinvoke.lr=3e-3"]


@pytest.mark.parametrize("n, pps, steps", [(48, 32, 20), (48, 4, 3), (5, 8, 7)])
def test_the_reinvocation_phase_runs_exactly_its_steps(n, pps, steps):
    cfg = SFTReinvokeConfig(prompts_per_step=pps, micro_batch_size=pps)
    cfg.reinvoke.steps, cfg.reinvoke.lr = steps, 2e-6
    sft_cfg, distill = phase_configs(cfg, n)
    assert steps_per_task(distill, n) == steps
    assert (distill.teacher, distill.teacher_template, distill.divergence) == (
        "frozen",
        "prompt_only",
        "reverse",
    )
    assert (distill.optim.lr, distill.skip_first_tokens, distill.prompts_per_step) == (2e-6, 0, pps)
    assert sft_cfg.name == "sft" and sft_cfg.optim.lr == cfg.optim.lr and sft_cfg.epochs == cfg.epochs


def test_config_and_errors():
    cfg = compose(["method=sft_reinvoke"]).method
    assert isinstance(cfg, SFTReinvokeConfig) and cfg.reinvoke.prompts.path == "general"
    with pytest.raises(ConfigError, match="method.reinvoke.teacher='student' is not one of: base, previous"):
        compose(["method=sft_reinvoke", "method.reinvoke.teacher=student"])
    with pytest.raises(ConfigError, match="method.reinvoke.steps must be > 0"):
        compose(["method=sft_reinvoke", "method.reinvoke.steps=0"])


def test_teacher_load_weights_replaces_the_copy(tiny_model, tiny_model_dir):
    model, _ = tiny_model
    student = type(model)(model.config)  # other (random) weights
    teacher = Teacher("frozen", student, 1.0)
    teacher.load_weights(tiny_model_dir)
    for (name, p), q in zip(teacher.model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(p, q.float()), name
    with pytest.raises(ValueError, match="live teacher"):
        Teacher("live", student, 1.0).load_weights(tiny_model_dir)


def test_sft_then_reinvocation_end_to_end_and_resume_between_phases(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    run = tmp_path / "r"
    sdft("run", *RUN, "method.reinvoke.steps=3", f"run_dir={run}", cwd=tmp_path)
    train = run / "t01_facts" / "train"
    assert (train / "sft" / "manifest.json").is_file() and (train / "manifest.json").is_file()
    assert not (train / "sft" / "checkpoints").exists()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["step"], r["task"]) for r in records if "step" in r]
    assert steps == [(1, "facts"), (2, "facts")] + [(k, "method.reinvoke.prompts") for k in (3, 4, 5)]
    divergence = [r["train/divergence"] for r in records if r.get("task") == "method.reinvoke.prompts"]
    assert divergence[0] > 0 and divergence[-1] < divergence[0]  # the student moves back toward the base
    sft_w = load_file(str(train / "sft" / "model" / "model.safetensors"))
    final = load_file(str(train / "model" / "model.safetensors"))
    assert any(not torch.equal(sft_w[k], final[k]) for k in final)

    # phase 1 done, phase 2 lost: a re-run starts phase 2 from the SFT result and ends where it did
    (train / "manifest.json").unlink()
    shutil.rmtree(train / "model")
    shutil.rmtree(run / "t01_facts" / "eval")
    sdft("run", *RUN, "method.reinvoke.steps=3", f"run_dir={run}", cwd=tmp_path)
    again = load_file(str(train / "model" / "model.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)
    steps_again = [
        r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "step" in r
    ]
    assert steps_again == [1, 2, 3, 4, 5]


def test_a_prompt_set_too_long_for_the_context_fails_before_any_work(tmp_path, tiny_model_dir):
    write_jsonl(tmp_path / "p" / "train.jsonl", [{"prompt": "hello"}, {"prompt": "word " * 2000}])
    out = sdft(
        "run",
        *RUN,
        "method.reinvoke.prompts.source=json",
        f"method.reinvoke.prompts.path={tmp_path / 'p'}",
        f"run_dir={tmp_path / 'r'}",
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode == 2
    assert "task method.reinvoke.prompts: train row 1: prompt is" in out.stderr
    assert not (tmp_path / "r" / "t00_base").exists()


def test_plan_counts_the_reinvocation_steps():
    from sdft_cli.plan import plan

    cfg = compose([*SMOKE[:1], "method=sft_reinvoke", "task=[facts,mcq]", "method.reinvoke.steps=3"])
    p = plan(cfg, 1e6)
    assert p["optimizer_steps"] == sum(t["steps"] for t in p["tasks"]) + 2 * 3
    assert p["reinvoke"]["completions"] == 2 * 3 * cfg.method.prompts_per_step
    assert p["rollout_tokens"] == p["reinvoke"]["completions"] * 128
