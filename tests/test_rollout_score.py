"""Batched generation and completion scoring agree with one-sequence-at-a-time brute force."""

import pytest
import torch
from conftest import hf_engine

from sdft_cli.forward import completion_logits
from sdft_cli.rollout import Sampling, completion_mask, left_pad


def _generate(model, tok, prompts, sampling, eos):
    """Decode on the in-place engine over ``model``, as evaluation does."""
    return hf_engine(model, tok, eos).generate(prompts, sampling)


def test_completion_mask_stops_after_first_eos():
    comp = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 3, 3, 3, 3]])
    mask, truncated = completion_mask(comp, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_completion_mask_with_length_caps_ignores_padding_that_looks_like_eos():
    """pad == eos: a row cut by its cap must not read its padding as an EOS."""
    comp = torch.tensor([[5, 6, 7, 2, 2], [5, 2, 7, 8, 9], [5, 6, 7, 8, 9]])
    mask, truncated = completion_mask(comp, [2], torch.tensor([3, 5, 4]))
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]
    assert truncated.tolist() == [True, False, True]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_greedy_batch_equals_one_by_one(tiny_model):
    """Left padding and position ids must not change what a prompt generates, nor where it stops."""
    model, tok = tiny_model
    prompts = [tok(t)["input_ids"] for t in ("hi", "a much longer prompt here", "mid length")]
    s = Sampling(max_new_tokens=12, temperature=0.0, batch_size=8)
    # make the third token the first prompt generates an end token, so early stops are exercised
    probe = _generate(model, tok, prompts[:1], s, [tok.eos_token_id])
    eos = [tok.eos_token_id, int(probe.completion_ids[0, 2])]
    batched = _generate(model, tok, prompts, s, eos)
    assert not batched.truncated[0] and int(batched.completion_mask[0].sum()) <= 3
    for i, p in enumerate(prompts):
        alone = _generate(model, tok, [p], s, eos)
        n = int(alone.completion_mask[0].sum())
        assert batched.completion_ids[i, :n].tolist() == alone.completion_ids[0, :n].tolist()
        assert int(batched.completion_mask[i].sum()) == n
        assert batched.truncated[i] == alone.truncated[0] and batched.texts[i] == alone.texts[0]


def test_min_new_tokens_suppresses_the_end_until_the_cap(tiny_model):
    """rollout.min_new_tokens = max: every completion is exactly that long (a benchmark's fixed work)."""
    model, tok = tiny_model
    prompts = [tok(t)["input_ids"] for t in ("hi", "a much longer prompt here")]
    probe = _generate(model, tok, prompts, Sampling(max_new_tokens=12, temperature=0.0), [tok.eos_token_id])
    eos = [tok.eos_token_id, int(probe.completion_ids[0, 1])]  # the first prompt would stop at token 2
    free = _generate(model, tok, prompts, Sampling(max_new_tokens=12, temperature=0.0), eos)
    assert free.lengths[0] <= 2
    forced = _generate(
        model, tok, prompts, Sampling(max_new_tokens=12, temperature=0.0, min_new_tokens=12), eos
    )
    assert forced.lengths == [12, 12] and forced.truncated == [True, True]


def test_the_models_generation_config_does_not_leak_into_sampling(tiny_model):
    """A repetition penalty in the model's generation_config.json must not change what is generated."""
    model, tok = tiny_model
    prompts = [tok("the the the the")["input_ids"]]
    s = Sampling(max_new_tokens=10, temperature=0.0)
    plain = _generate(model, tok, prompts, s, [tok.eos_token_id])
    model.generation_config.repetition_penalty = 100.0
    model.generation_config.no_repeat_ngram_size = 1
    try:
        assert torch.equal(
            _generate(model, tok, prompts, s, [tok.eos_token_id]).completion_ids, plain.completion_ids
        )
        reference = model.generate(input_ids=torch.tensor(prompts), max_new_tokens=10, do_sample=False)
        assert (
            reference[0, len(prompts[0]) :].tolist() != plain.completion_ids[0].tolist()
        )  # the penalty bites
    finally:
        model.generation_config.repetition_penalty = 1.0
        model.generation_config.no_repeat_ngram_size = 0
    assert model.generation_config.repetition_penalty == 1.0


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    model, tok = tiny_model
    prompts = [tok("seed test")["input_ids"]] * 4
    s = Sampling(max_new_tokens=10, temperature=1.0, batch_size=2)
    torch.manual_seed(123)
    a = _generate(model, tok, prompts, s, [tok.eos_token_id])
    torch.manual_seed(123)
    b = _generate(model, tok, prompts, s, [tok.eos_token_id])
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_completion_logits_equal_an_unpadded_forward(tiny_model):
    """Row t of completion_logits is the model's prediction of completion token t, padding or not."""
    model, tok = tiny_model
    contexts = [tok("short")["input_ids"], tok("a rather longer context")["input_ids"]]
    comps = [[10, 11, 12, 13], [20, 21]]
    width = 4
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, c in enumerate(comps):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    got = completion_logits(model, contexts, ids, mask, tok.pad_token_id)
    assert got.requires_grad
    with torch.no_grad():
        for i, (ctx, c) in enumerate(zip(contexts, comps, strict=True)):
            full = model(input_ids=torch.tensor([ctx + c])).logits[0]
            want = full[len(ctx) - 1 : len(ctx) - 1 + len(c)]
            assert torch.allclose(got[i, : len(c)], want, atol=1e-4)
    assert got.shape == (2, width, model.config.vocab_size)


def test_evaluating_tasks_together_equals_each_alone(tiny_model, copy_task_dir):
    """Each task keeps its own max_new_tokens, and batch size does not change greedy results."""
    from sdft_cli.config import TaskConfig
    from sdft_cli.evaluate import evaluate, evaluate_many
    from sdft_cli.tasks import load_task

    model, tok = tiny_model
    short = load_task(
        "short", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=3), train=False
    )
    long = load_task(
        "long", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=9), train=False
    )
    pooled = evaluate_many(hf_engine(model, tok), tok, [short, long], batch_size=3)
    for task, res in zip((short, long), pooled, strict=True):
        alone = evaluate(hf_engine(model, tok), tok, task, batch_size=1)
        assert [p["prediction"] for p in res.predictions] == [p["prediction"] for p in alone.predictions]
        assert [p["truncated"] for p in res.predictions] == [p["truncated"] for p in alone.predictions]
        assert res.value == alone.value and res.n == 2
    # the caps differ, so the short task really was cut shorter
    assert len(pooled[0].predictions[0]["prediction"]) < len(pooled[1].predictions[0]["prediction"])


def test_sampler_logprobs_are_the_models_temperature_scaled_logprobs(tiny_model):
    """The log-probs recorded during sampling equal a separate scoring pass of the same tokens."""
    model, tok = tiny_model
    prompts = [tok(t)["input_ids"] for t in ("hi", "a much longer prompt here", "mid")]
    torch.manual_seed(0)
    s = Sampling(max_new_tokens=10, temperature=0.7, batch_size=2, logprobs=True)
    ro = _generate(model, tok, prompts, s, [tok.eos_token_id])
    comp, mask = ro.completion_ids.clone(), ro.completion_mask.clone()
    with torch.no_grad():
        logits = completion_logits(model, prompts, comp, mask, tok.pad_token_id)
    want = torch.log_softmax(logits / 0.7, -1).gather(-1, comp.unsqueeze(-1)).squeeze(-1) * mask
    assert ro.logprobs is not None and mask.sum() > 10
    assert torch.allclose(ro.logprobs, want, atol=1e-4)
    assert (ro.logprobs[mask.bool()] < 0).all()


def test_hidden_states_through_the_output_head_are_the_completion_logits(tiny_model):
    from sdft_cli.forward import completion_hidden, output_head

    model, tok = tiny_model
    contexts = [tok("first context")["input_ids"], tok("x")["input_ids"]]
    comp = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    head, params = output_head(model)
    with torch.no_grad():
        via_head = head(completion_hidden(model, contexts, comp, mask, tok.pad_token_id))
        direct = completion_logits(model, contexts, comp, mask, tok.pad_token_id)
    assert torch.allclose(via_head, direct, atol=1e-5)
    # tied embeddings: the head's trainable tensor is the input embedding matrix
    assert params and params[0] is model.get_output_embeddings().weight


def test_kl_to_base_is_zero_for_the_base_and_matches_a_brute_force_sum(tiny_model, copy_task_dir):
    import copy
    import math

    from sdft_cli.config import TaskConfig
    from sdft_cli.evaluate import evaluate_many, kl_to_base
    from sdft_cli.tasks import load_task

    model, tok = tiny_model
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=5))
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    res = evaluate_many(hf_engine(other, tok), tok, [task], batch_size=4)[0]
    assert kl_to_base(model, model, res, pad_id=tok.pad_token_id)["kl_to_base_token"] == 0.0
    got = kl_to_base(model, other, res, pad_id=tok.pad_token_id, batch_size=2)
    # brute force: one unpadded sequence at a time, KL summed with Python floats, both directions
    total, reverse, count, seqs = 0.0, 0.0, 0, []
    for ctx, c, m in zip(res.contexts, res.completions.clone(), res.completion_mask.clone(), strict=True):
        n = int(m.sum())
        ids = torch.tensor([ctx + c[:n].tolist()])
        with torch.no_grad():
            lb = torch.log_softmax(model(ids).logits[0, len(ctx) - 1 : len(ctx) - 1 + n].double(), -1)
            lm = torch.log_softmax(other(ids).logits[0, len(ctx) - 1 : len(ctx) - 1 + n].double(), -1)
        per = [
            sum(math.exp(a) * (a - b) for a, b in zip(lb[t].tolist(), lm[t].tolist(), strict=True))
            for t in range(n)
        ]
        reverse += sum(
            sum(math.exp(b) * (b - a) for a, b in zip(lb[t].tolist(), lm[t].tolist(), strict=True))
            for t in range(n)
        )
        total, count = total + sum(per), count + n
        seqs.append(sum(per))
    assert got["kl_to_base_token"] == pytest.approx(total / count, rel=1e-3)
    assert got["kl_to_base_seq"] == pytest.approx(sum(seqs) / len(seqs), rel=1e-3)
    assert got["kl_model_base_token"] == pytest.approx(reverse / count, rel=1e-3)
    assert got["kl_model_base_token"] != pytest.approx(got["kl_to_base_token"], rel=1e-3)
    assert got["kl_to_base_token"] > 0


def test_kl_to_base_reads_the_base_model_on_its_own_contexts(tiny_model, copy_task_dir):
    """With base_contexts, the base reads other prompts before the same completions (the teacher's KL
    from the base student, paper Sec. 3.2): equal to a brute force over the two contexts."""
    from sdft_cli.config import TaskConfig
    from sdft_cli.evaluate import evaluate_many, kl_to_base
    from sdft_cli.names import TEACHER_TEMPLATES
    from sdft_cli.tasks import load_task

    model, tok = tiny_model
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=5))
    res = evaluate_many(
        hf_engine(model, tok), tok, [task], batch_size=4, teacher_template=TEACHER_TEMPLATES["toy"]
    )[0]
    base_ctx = [tok(ex.prompt, add_special_tokens=False)["input_ids"] for ex in task.test]
    got = kl_to_base(model, model, res, pad_id=tok.pad_token_id, batch_size=3, base_contexts=base_ctx)
    total, count = 0.0, 0
    for ctx, bctx, c, m in zip(
        res.contexts, base_ctx, res.completions.clone(), res.completion_mask.clone(), strict=True
    ):
        n = int(m.sum())
        with torch.no_grad():
            lm = model(torch.tensor([ctx + c[:n].tolist()])).logits[0, len(ctx) - 1 : len(ctx) - 1 + n]
            lb = model(torch.tensor([bctx + c[:n].tolist()])).logits[0, len(bctx) - 1 : len(bctx) - 1 + n]
        lb, lm = torch.log_softmax(lb.double(), -1), torch.log_softmax(lm.double(), -1)
        total += float((lb.exp() * (lb - lm)).sum())
        count += n
    assert got["kl_to_base_token"] == pytest.approx(total / count, rel=1e-3)
    assert got["kl_to_base_token"] > 0


def test_pass_at_k_evaluation_counts_correct_samples(tiny_model, copy_task_dir):
    """Near-greedy sampling reproduces greedy decoding: with references set to the greedy output for
    half the prompts, those get n correct samples and the others none; pass@k is the estimator's mean."""
    import dataclasses

    from sdft_cli.config import PassAtKConfig, TaskConfig
    from sdft_cli.evaluate import evaluate_many, pass_at_k
    from sdft_cli.metrics import pass_at_k as estimate
    from sdft_cli.tasks import load_task

    model, tok = tiny_model
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=4))
    task.test = task.test + [
        dataclasses.replace(ex, index=ex.index + 2, prompt=ex.prompt + "!") for ex in task.test
    ]
    greedy = evaluate_many(hf_engine(model, tok), tok, [task])[0]
    task.test = [
        dataclasses.replace(ex, answer=p["prediction"] if i % 2 == 0 else "zzz zzz")
        for i, (ex, p) in enumerate(zip(task.test, greedy.predictions, strict=True))
    ]
    cfg = PassAtKConfig(k=[1, 2, 4], n=4, temperature=1e-6, top_p=1.0)
    got = pass_at_k(hf_engine(model, tok), tok, task, cfg)
    assert got["correct"] == [4, 0, 4, 0]
    for k in cfg.k:
        expected = sum(estimate(4, c, k) for c in got["correct"]) / len(task.test)
        assert got["pass_at_k"][str(k)] == pytest.approx(expected) == 0.5
    hot = pass_at_k(hf_engine(model, tok), tok, task, PassAtKConfig(k=[1, 8], n=8, temperature=1.0))
    assert 0.0 <= hot["pass_at_k"]["1"] <= hot["pass_at_k"]["8"] <= 1.0
