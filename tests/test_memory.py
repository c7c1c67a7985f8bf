"""The memory plan: its activation trace against autograd on real tensors, its state against the options.

How close its peaks come to measured ones is ``scripts/bench_memory.py``'s job (docs/memory.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sdft_cli import lora
from sdft_cli.compose import compose
from sdft_cli.config import LoraConfig
from sdft_cli.memory import _saved_bytes, trace_activations
from sdft_cli.plan import count_parameters, count_trainable, memory

QWEN = Path(__file__).resolve().parents[1] / "docs" / "models" / "qwen2.5-7b-instruct"


def _arch(layers: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_the_fake_trace_counts_what_autograd_saves_on_real_weights(amp, adapters):
    """Two and three fake blocks extrapolated to four give the bytes a real four-block model saves for its
    backward (bf16 weight casts included, weights themselves not), with and without LoRA."""
    cfg = LoraConfig(r=4) if adapters else None
    per_block, outside = trace_activations(_arch(1), rows=3, length=21, amp=amp, lora_cfg=cfg)
    torch.manual_seed(0)
    real = LlamaForCausalLM(_arch(4))
    if adapters:
        lora.attach(real, cfg, teacher=False)
    real.train()
    assert per_block > 0
    assert 4 * per_block + outside == _saved_bytes(real, 3, 21, amp)


def test_the_state_follows_the_options(offline_env):
    base = ["experiment=smoke", "task=[toolcall]"]
    full = memory(compose(base))
    assert full is not None
    params = count_parameters(compose(base))
    p = full.parts
    assert p["weights"] == p["gradients"] == p["teacher"] == 4 * params
    assert p["optimizer"] == 8 * params and p["optimizer_step"] == 0  # torch's fused AdamW

    low = memory(compose([*base, "method.optim.moments=bf16", "method.teacher_storage=offset"])).parts
    assert low["optimizer"] == 4 * params and low["teacher"] == 2 * params and low["optimizer_step"] > 0

    adapted_cfg = compose([*base, "model.lora.r=4"])
    adapters = count_trainable(adapted_cfg)
    a = memory(adapted_cfg).parts
    assert 0 < adapters < params
    assert a["weights"] == 4 * (params + adapters) and a["gradients"] == a["teacher"] == 4 * adapters
    assert a["optimizer"] == 8 * adapters

    assert memory(compose([*base, "method.teacher=live"])).parts["teacher"] == 0
    ckpt = memory(compose([*base, "method.gradient_checkpointing=true"])).parts
    assert ckpt["activations"] < p["activations"]
    longer = memory(compose([*base, "rollout.max_new_tokens=64"])).parts
    assert longer["activations"] > p["activations"] and longer["kv_cache"] > p["kv_cache"]


def test_the_7b_plan_reads_the_architecture_and_the_caps(offline_env):
    """Qwen2.5-7B-Instruct's config (docs/models) gives its published 7.62 B parameters; without its
    tokenizer and rows the lengths come from method.max_prompt_tokens and the rollout's cap."""
    args = ["experiment=paper_science", f"model.path={QWEN}", "method=sdft", "method.max_prompt_tokens=1024"]
    cfg = compose(args)
    assert count_parameters(cfg) == pytest.approx(7.62e9, rel=2e-3)
    full = memory(cfg, "cuda", 80)
    assert full.parts["weights"] == 2 * count_parameters(cfg)  # bf16
    assert any("max_prompt_tokens" in n for n in full.notes)
    adapted = memory(compose([*args, "model.lora.r=16", "select=last"]), "cuda", 80)
    assert adapted.peak < full.peak
    sharded = memory(cfg, "cuda", 80, processes=8)
    assert sharded.parts["optimizer"] == full.parts["optimizer"] / 8
    host = memory(compose([*args, "method.teacher_storage=cpu"]), "cuda", 80)
    assert host.parts["teacher"] == 0 < full.parts["teacher"] and host.peak < full.peak
    assert any("host memory" in n for n in host.notes)
