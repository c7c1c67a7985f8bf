"""`sdft plan`: sizes, steps and compute from the config and the data, without the weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from conftest import sdft

from sdft_cli.compose import compose
from sdft_cli.plan import count_parameters, count_trainable, plan, render


def test_steps_tokens_and_flops_follow_the_config(offline_env):
    cfg = compose(["experiment=smoke", "task=[facts,mcq]", "method.max_steps=null", "method.epochs=2"])
    p = plan(cfg, params=1e9)
    facts, mcq = p["tasks"]
    # bundled sizes (train 48 / 40 rows), the smoke batch of 4 prompts, eval capped at 4 items
    assert (facts["n_train"], mcq["n_train"], facts["n_test"]) == (48, 40, 4)
    assert facts["steps"] == math.ceil(2 * 48 / 4) and mcq["steps"] == math.ceil(2 * 40 / 4)
    assert facts["completions"] == facts["steps"] * 4
    # rollouts stop at rollout.max_new_tokens (smoke: 8); evaluation at each task's max_new_tokens (24)
    assert (facts["train_tokens"], facts["eval_tokens"], mcq["eval_tokens"]) == (8, 24, 24)
    assert p["rollout_tokens"] == (facts["completions"] + mcq["completions"]) * 8
    stages, probes = 3, sum(p["probes"].values())
    assert p["eval_generations"] == stages * (4 + 4 + probes)
    train = 10 * 1e9 * (facts["completions"] + mcq["completions"]) * 8
    gen = 2 * 1e9 * stages * (4 * 24 + 4 * 24 + sum(16 * n for n in p["probes"].values()))
    assert p["flops"] == train + gen


def test_sft_trains_without_rollouts(offline_env):
    p = plan(compose(["experiment=smoke", "method=sft", "task=[facts]"]), params=1e9)
    (facts,) = p["tasks"]
    assert p["rollout_tokens"] == 0 and facts["steps"] == 2 and facts["train_tokens"] == 24
    gen = 2 * 1e9 * 2 * (4 * 24 + sum(16 * n for n in p["probes"].values()))
    assert p["flops"] == 6 * 1e9 * facts["completions"] * 24 + gen
    assert "flops" not in plan(compose(["experiment=smoke"]), params=None)


def test_parameters_come_from_the_config_on_the_meta_device(tiny_model, tiny_model_dir):
    model, _ = tiny_model
    cfg = compose(["model=hf", f"model.path={tiny_model_dir}", "model.name=t"])
    assert count_parameters(cfg) == sum(p.numel() for p in model.parameters())
    # a tiny random model is sized from its own config (nothing built)
    from sdft_cli.builders import build_tiny_tokenizer, llama_config

    smoke = compose(["experiment=smoke"])
    tiny = transformers.LlamaForCausalLM(llama_config(smoke.model.tiny, build_tiny_tokenizer()))
    assert count_parameters(smoke) == sum(p.numel() for p in tiny.parameters())
    assert count_parameters(compose(["experiment=toy_world"])) is None  # built by pretraining


def test_lora_counts_the_adapters_parameters_and_trains_at_4n(tiny_model, tiny_model_dir):
    model, _ = tiny_model
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    cfg = compose(["model=hf", f"model.path={tiny_model_dir}", "model.name=t", "model.lora.r=8"])
    # r (in + out) for every targeted linear of the real model
    expected = sum(
        8 * (m.in_features + m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rpartition(".")[2] in targets
    )
    assert count_trainable(cfg) == expected
    assert count_trainable(compose(["model=hf", f"model.path={tiny_model_dir}", "model.name=t"])) == sum(
        p.numel() for p in model.parameters()
    )
    sft = ["experiment=smoke", "method=sft", "task=[facts]"]
    full = plan(compose(sft), params=1e9)
    adapted = plan(compose([*sft, "model.lora.r=8"]), 1e9, expected)
    (facts,) = full["tasks"]
    trained = facts["completions"] * 24 * 1e9
    assert full["flops"] - adapted["flops"] == pytest.approx(2 * trained)  # 6N -> 4N per trained token
    assert "trainable parameters:" in render(adapted, 400) and "LoRA r=8" in render(adapted, 400)


def test_cli_prints_the_plan_and_json(offline_env, tmp_path):
    args = ("plan", "experiment=smoke", "--params", "7e9")
    out = sdft(*args, "--device-gib", "0.5", cwd=tmp_path)
    assert "optimizer steps: 6" in out.stdout and "GPU-hours at 400 effective TFLOP/s" in out.stdout
    # the memory plan for one GPU of 0.5 GiB: the CUDA context alone does not fit
    assert "memory plan, per CUDA device" in out.stdout and "fits 0.5 GiB: NO" in out.stdout
    data = json.loads(sdft(*args, "--json", cwd=tmp_path).stdout)
    assert data["params"] == 7e9 and [t["name"] for t in data["tasks"]] == ["toolcall", "mcq", "facts"]
    mem = data["memory"]  # this machine's device, the tiny model's own size (not --params)
    assert mem["peak"] == max(mem["phases"].values()) and mem["parts"]["weights"] > 0
    bad = sdft("plan", "task=nope", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "unknown task 'nope'" in bad.stderr
