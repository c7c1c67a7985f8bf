"""LoRA (sdft_cli/lora.py): adapters injected by peft, the teacher as a second adapter, merged weights for
everything outside the step, checked against brute-force references on the tiny model; then runs."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SMOKE, sdft
from safetensors.torch import load_file

from sdft_cli import lora
from sdft_cli.config import LoraConfig
from sdft_cli.engines import DecoderEngine, HFEngine
from sdft_cli.models import load_model
from sdft_cli.rollout import Sampling
from sdft_cli.teacher import Teacher

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapted(tiny_model, r=4, std=0.05, seed=0):
    """A copy of the tiny model with LoRA attached and the student's adapter set to random values."""
    model = copy.deepcopy(tiny_model[0])
    lora.attach(model, LoraConfig(r=r, alpha=8.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora._adapter_params(model, lora.STUDENT).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def _reference(base, model, adapter):
    """Brute force: the base model with W + (alpha / r) B A added to every targeted linear."""
    ref = copy.deepcopy(base)
    params = lora._adapter_params(model, adapter)
    with torch.no_grad():
        for name, m in ref.named_modules():
            if name.rpartition(".")[2] in TARGETS:
                a, b = params[f"{name}.lora_A.weight"], params[f"{name}.lora_B.weight"]
                m.weight.add_((8.0 / 4) * b @ a)
    return ref


def _ids():
    return torch.randint(5, 200, (3, 11), generator=torch.Generator().manual_seed(1))


def test_attaching_changes_nothing_and_trains_only_the_students_adapter(tiny_model):
    base = tiny_model[0]
    model = copy.deepcopy(base)
    before = model(_ids()).logits
    lora.attach(model, LoraConfig(r=4))
    assert torch.equal(model(_ids()).logits, before)  # B = 0: the function is unchanged
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n and ".student." in n for n in trainable)
    # r (in + out) per targeted linear, counted from the base model's shapes
    expected = sum(
        4 * (m.in_features + m.out_features)
        for n, m in base.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rpartition(".")[2] in TARGETS
    )
    assert lora.trainable_parameters(model) == expected
    assert all(p.dtype == torch.float32 for p in lora._adapter_params(model, lora.TEACHER).values())


def test_the_adapted_model_its_merge_and_its_merged_state_are_the_brute_force_model(tiny_model):
    model = _adapted(tiny_model)
    ref = _reference(tiny_model[0], model, lora.STUDENT)(_ids()).logits
    out = model(_ids()).logits
    assert torch.allclose(out, ref, atol=1e-5)
    plain = copy.deepcopy(tiny_model[0])
    plain.load_state_dict(lora.merged_state(model))  # base names, adapter folded in (vLLM, rollout dirs)
    assert torch.allclose(plain(_ids()).logits, ref, atol=1e-5)
    lora.merge_and_unload(model)
    assert not lora.attached(model) and not hasattr(model, "peft_config")
    assert set(model.state_dict()) == set(tiny_model[0].state_dict())
    assert torch.allclose(model(_ids()).logits, ref, atol=1e-5)


def test_the_ema_teacher_is_a_second_adapter_that_follows_the_student(tiny_model):
    model = _adapted(tiny_model)
    n_params = sum(p.numel() for p in model.parameters())
    teacher = Teacher("ema", model, alpha=0.25)
    assert teacher.model is model  # the base weights exist once
    assert sum(p.numel() for p in model.parameters()) == n_params
    start = lora.state(model, lora.TEACHER)
    assert all(torch.equal(start[k], v) for k, v in lora.state(model).items())  # starts as the student
    with torch.no_grad():
        for p in lora._adapter_params(model, lora.STUDENT).values():
            p.mul_(-2.0)
    student = lora.state(model)
    teacher.update(model)
    after = lora.state(model, lora.TEACHER)
    for k in after:  # phi <- alpha theta + (1 - alpha) phi, factor by factor
        assert torch.allclose(after[k], 0.25 * student[k] + 0.75 * start[k], atol=1e-7)
    with teacher.scoring():
        scored = model(_ids()).logits
    assert torch.allclose(scored, _reference(tiny_model[0], model, lora.TEACHER)(_ids()).logits, atol=1e-5)
    assert torch.allclose(
        model(_ids()).logits, _reference(tiny_model[0], model, lora.STUDENT)(_ids()).logits, atol=1e-5
    )
    assert all(p.requires_grad for p in lora._adapter_params(model, lora.STUDENT).values())
    assert not any(p.requires_grad for p in lora._adapter_params(model, lora.TEACHER).values())
    # a frozen teacher does not move; its state round-trips through the checkpoint's dict
    frozen = Teacher("frozen", model, alpha=0.25)
    held = frozen.state_dict()
    with torch.no_grad():
        for p in lora._adapter_params(model, lora.STUDENT).values():
            p.add_(1.0)
    frozen.update(model)
    assert all(torch.equal(held[k], v) for k, v in lora.state(model, lora.TEACHER).items())
    frozen.load_state_dict(start)
    assert all(torch.equal(start[k], v) for k, v in lora.state(model, lora.TEACHER).items())


@pytest.mark.parametrize("decoder", ["generate", "auto", "owned"])
def test_every_decoder_samples_the_adapted_model(tiny_model, decoder):
    model = _adapted(tiny_model, std=0.2)
    model.train()
    tok = tiny_model[1]
    prompts = [_ids()[i, : 5 + 3 * i].tolist() for i in range(3)]
    greedy = Sampling(max_new_tokens=10, temperature=0, logprobs=True)
    ref_model = _reference(tiny_model[0], model, lora.STUDENT).eval()
    ref = HFEngine(ref_model, tok, [tok.eos_token_id], decoder="generate").generate(prompts, greedy)
    if decoder == "owned":  # its own fused copy, built from the merged weights
        engine = DecoderEngine(torch.float32, tok, [tok.eos_token_id])
        engine.push(model)
    else:  # in place: the LoRA layers run as modules
        engine = HFEngine(model, tok, [tok.eos_token_id], decoder=decoder)
    out = engine.generate(prompts, greedy)
    assert torch.equal(out.completion_ids, ref.completion_ids)
    assert torch.allclose(out.logprobs, ref.logprobs, atol=1e-4)
    base = HFEngine(tiny_model[0], tok, [tok.eos_token_id], decoder="generate").generate(prompts, greedy)
    assert not torch.equal(base.completion_ids, ref.completion_ids)  # the adapter changes the samples
    assert model.training  # a bound decoder puts the student back in train mode


def test_the_saved_adapter_loads_with_peft(tiny_model, tiny_model_dir, tmp_path):
    from peft import PeftModel

    model = _adapted(tiny_model)
    lora.save_adapter(tmp_path / "adapter", lora.state(model), model.peft_config[lora.STUDENT])
    loaded = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "adapter")
    assert torch.allclose(loaded(_ids()).logits, model(_ids()).logits, atol=1e-5)
    other = copy.deepcopy(tiny_model[0])
    lora.attach(other, LoraConfig(r=4, alpha=8.0))
    lora.load_adapter(other, tmp_path / "adapter")
    assert torch.allclose(other(_ids()).logits, model(_ids()).logits, atol=1e-6)


def test_bad_lora_settings_name_the_key(tmp_path):
    for override, key in [
        ("model.lora.r=-1", "model.lora.r"),
        ("model.lora.dropout=1.5", "model.lora.dropout"),
        ("model.lora.between_tasks=sometimes", "model.lora.between_tasks"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ]:
        out = sdft("show", *SMOKE, "model.lora.r=4", override, cwd=tmp_path, check=False)
        assert out.returncode != 0 and key in out.stdout + out.stderr, (override, out.stdout, out.stderr)
    out = sdft(
        "run",
        *SMOKE,
        "model.lora.r=4",
        "model.lora.target_modules=[nothing]",
        f"run_dir={tmp_path / 'r'}",
        cwd=tmp_path,
        check=False,
    )
    assert out.returncode != 0 and "model.lora.target_modules" in out.stdout + out.stderr


@pytest.mark.parametrize("between", ["merge", "keep"])
def test_a_lora_run_saves_plain_stage_models_and_carries_its_adapter_between_tasks(
    tmp_path, tiny_model_dir, between
):
    run = tmp_path / "r"
    args = [
        *SMOKE,
        "task=[facts,mcq]",
        "model.lora.r=4",
        f"model.lora.between_tasks={between}",
        "method.save_teacher=true",
        f"run_dir={run}",
    ]
    sdft("run", *args, cwd=tmp_path)
    base = load_model(tiny_model_dir)
    stages = [run / "t01_facts" / "train", run / "t02_mcq" / "train"]
    models = [load_model(s / "model") for s in stages]  # plain Hugging Face directories
    assert set(models[0].state_dict()) == set(base.state_dict())
    adapters = [
        {
            k.removeprefix("base_model.model."): v
            for k, v in load_file(str(s / "adapter" / lora.ADAPTER_FILE)).items()
        }
        for s in stages
    ]
    teacher = load_file(str(stages[1] / "teacher" / "teacher.safetensors"))
    assert set(teacher) == set(adapters[1]) and any(
        not torch.equal(teacher[k], adapters[1][k]) for k in teacher
    )
    # each stage model is its start plus its adapter: the previous stage's model (merge), or the base
    # with the one adapter trained on through both tasks (keep)
    for i, stage_model in enumerate(models):
        start = base if (i == 0 or between == "keep") else models[i - 1]
        rebuilt = copy.deepcopy(start)
        lora.attach(rebuilt, LoraConfig(r=4), teacher=False)
        lora.load_state(rebuilt, adapters[i])
        lora.merge_and_unload(rebuilt)
        for k, v in stage_model.state_dict().items():
            assert torch.allclose(v, rebuilt.state_dict()[k], atol=1e-6), k
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in models[0].state_dict().items())
    # lora_A starts random: the second task's is the first's trained on (keep) or a fresh draw (merge)
    a = "model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.allclose(adapters[1][a], adapters[0][a], atol=1e-3) == (between == "keep")
