"""Each training method as a function over artifacts, on the tiny model: it trains, logs and saves."""

import copy
import json

import pytest
import torch
from conftest import train_context

from sdft_cli.artifacts import RunLayout, is_complete
from sdft_cli.config import RolloutConfig, TaskConfig
from sdft_cli.methods import METHODS
from sdft_cli.tasks import load_task

VARIANTS = [
    ("sdft", {}),
    ("sdft", {"divergence": "reverse", "support": "topk", "topk": 8, "teacher": "frozen"}),
    (
        "sdft",
        {
            "divergence": "jsd",
            "jsd_beta": 0.3,
            "support": "topk",
            "topk_source": "student",
            "topk_tail": "bucket",
        },
    ),
    (
        "sdft",
        {"divergence": "reverse", "estimator": "sampled", "importance_sampling": "on", "temperature": 0.8},
    ),
    ("sdft", {"divergence": "reverse", "estimator": "rb", "teacher": "live", "aggregation": "token_mean"}),
    ("offline_distill", {}),
    ("sft", {}),
    ("dft", {"loss_chunk_size": 0}),
]


@pytest.mark.parametrize(
    ("method", "options"), VARIANTS, ids=lambda v: v if isinstance(v, str) else ",".join(v)
)
def test_one_task_trains_logs_and_saves(method, options, tiny_model, copy_task_dir, tmp_path):
    model, tok = tiny_model
    student = copy.deepcopy(model)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = METHODS[method].schema(prompts_per_step=2, micro_batch_size=1, max_steps=3, loss_chunk_size=5)
    for k, v in options.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=6))
    layout = RunLayout(tmp_path)
    ctx = train_context(student, tok, cfg, layout)
    out = METHODS[method].train(ctx, task)

    assert out == layout.model(1, "copy") and (out / "model.safetensors").is_file()
    assert is_complete(layout.train(1, "copy")) and not (layout.train(1, "copy") / "checkpoints").exists()
    changed = sum(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert changed >= len(before) // 2
    records = [json.loads(line) for line in layout.metrics_log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["time/step"] > 0 and torch.isfinite(torch.tensor(r["train/loss"])) for r in records)
    if method in ("sft", "dft"):
        assert all(r["train/nll"] > 0 for r in records)
        return
    if options.get("estimator") != "sampled":  # the sampled estimate (log-ratio) may be negative
        assert all(r["train/divergence"] >= 0 for r in records)
    assert all(r["train/k3"] >= 0 and 0 < r["train/entropy_teacher"] for r in records)
    assert all(0 < r["train/masked_frac"] < 1 for r in records)  # the first 3 tokens of each completion
    if options.get("importance_sampling") == "on":
        # the float32 generation copy is the trainer's model: the sampler's log-probs are the trainer's
        assert all(abs(r["train/is_min"] - 1) < 1e-3 and abs(r["train/is_max"] - 1) < 1e-3 for r in records)
    else:
        assert "train/is_mean" not in records[0]
    samples = [json.loads(line) for line in ctx.samples_log.read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2, 3, 3] and all("completion" in s for s in samples)


def test_chunked_and_naive_training_steps_agree(tiny_model, copy_task_dir, tmp_path):
    """Two SDFT steps with the fused chunked loss and with full logits give the same losses and weights."""
    model, tok = tiny_model
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=6))
    results = []
    for chunk in (0, 3):
        student = copy.deepcopy(model)
        cfg = METHODS["sdft"].schema(
            prompts_per_step=2, micro_batch_size=1, max_steps=2, loss_chunk_size=chunk
        )
        cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
        layout = RunLayout(tmp_path / f"c{chunk}")
        METHODS["sdft"].train(train_context(student, tok, cfg, layout), task)
        records = [json.loads(line) for line in layout.metrics_log.read_text().splitlines()]
        results.append(([r["train/loss"] for r in records], student.state_dict()))
    (loss_a, w_a), (loss_b, w_b) = results
    # logged losses are rounded to 6 decimals: float32 differences can flip the last one
    assert loss_a == pytest.approx(loss_b, rel=1e-5, abs=1.5e-6)
    # Adam (lr 1e-3) turns float32 rounding differences of near-zero gradients into ~1e-5 weight changes;
    # a wrong gradient would move weights by ~lr
    assert all(torch.allclose(w_a[k], w_b[k], atol=5e-5) for k in w_a)
    assert any(not torch.equal(w_a[k], model.state_dict()[k]) for k in w_a)


def test_bf16_teacher_scoring_rounds_only_the_teacher(tiny_model, copy_task_dir, tmp_path):
    """method.teacher_precision=bf16 with an fp32 student: the same rollouts, a loss within bf16 rounding
    of the fp32-scored one, and not the same bits (the teacher really ran in bf16)."""
    model, tok = tiny_model
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=6))
    runs = []
    for precision in ("fp32", "bf16"):
        cfg = METHODS["sdft"].schema(
            prompts_per_step=2, micro_batch_size=2, max_steps=1, teacher_precision=precision
        )
        layout = RunLayout(tmp_path / precision)
        METHODS["sdft"].train(train_context(copy.deepcopy(model), tok, cfg, layout), task)
        runs.append(json.loads(layout.metrics_log.read_text().splitlines()[0]))
    fp32, bf16 = runs
    assert fp32["train/completion_len_mean"] == bf16["train/completion_len_mean"]
    assert bf16["train/loss"] == pytest.approx(fp32["train/loss"], rel=0.1)
    assert bf16["train/entropy_teacher"] != fp32["train/entropy_teacher"]
    assert bf16["train/entropy_student"] == fp32["train/entropy_student"]


def test_sft_loss_is_the_demonstration_nll(tiny_model, copy_task_dir, tmp_path):
    """At lr -> 0 the first logged SFT loss equals a brute-force NLL of prompt + demonstration."""
    from sdft_cli.prompts import encode_messages, encode_target, student_messages
    from sdft_cli.schedule import batch_indices

    model, tok = tiny_model
    student = copy.deepcopy(model)
    cfg = METHODS["sft"].schema(prompts_per_step=2, micro_batch_size=2, max_steps=1)
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-12, 0
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir)))
    layout = RunLayout(tmp_path)
    ctx = train_context(student, tok, cfg, layout, seed=3, rollout=RolloutConfig())
    METHODS["sft"].train(ctx, task)
    logged = json.loads(layout.metrics_log.read_text().splitlines()[0])["train/loss"]

    want = 0.0
    idx = batch_indices(len(task.train), 2, 0, (3, 1))
    with torch.no_grad():
        for i in idx:
            msgs = student_messages(task.train[i].prompt, None)
            prompt = encode_messages(tok, msgs)
            target = encode_target(tok, msgs, task.train[i].demonstration, [tok.eos_token_id])
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
            want += float(-logp[torch.arange(len(target)), torch.tensor(target)].mean()) / len(idx)
    assert logged == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize(
    ("options", "backend", "temperature", "on"),
    [
        ({}, "hf", 1.0, False),  # the trainer samples: nothing to correct
        ({}, "vllm", 1.0, True),  # another engine samples the student's rollouts
        ({}, "vllm", 0.0, False),  # greedy: no sampler probabilities
        ({"importance_sampling": "on"}, "hf", 1.0, True),
        ({"importance_sampling": "off"}, "vllm", 1.0, False),
        ({"generate_from": "teacher", "teacher": "frozen"}, "vllm", 1.0, False),  # the teacher samples
    ],
)
def test_importance_weights_only_correct_the_students_own_samples(options, backend, temperature, on):
    from sdft_cli.config import SDFTConfig
    from sdft_cli.methods.sdft import use_importance_sampling

    assert use_importance_sampling(SDFTConfig(**options), backend, temperature) is on


def test_offline_distillation_refuses_importance_weights():
    from sdft_cli.compose import compose
    from sdft_cli.errors import ConfigError

    assert compose(["method=offline_distill", "rollout.backend=vllm"]).method.generate_from == "teacher"
    with pytest.raises(ConfigError, match="method.importance_sampling=on corrects the student's own samples"):
        compose(["method=offline_distill", "method.importance_sampling=on"])


def test_a_teacher_from_the_base_model_starts_each_later_task_at_the_base(
    tiny_model, tiny_model_dir, copy_task_dir, tmp_path
):
    """method.teacher_init=base: at stage 2 a frozen teacher is the run's base model, not the student
    trained on stage 1 (whose weights differ)."""
    from safetensors.torch import load_file

    model, tok = tiny_model
    student = copy.deepcopy(model)
    with torch.no_grad():  # the student after some earlier task
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    cfg = METHODS["sdft"].schema(prompts_per_step=2, micro_batch_size=1, max_steps=2, loss_chunk_size=5)
    cfg.teacher, cfg.teacher_init, cfg.save_teacher = "frozen", "base", True
    cfg.__post_init__()
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=6))
    layout = RunLayout(tmp_path)
    ctx = train_context(student, tok, cfg, layout, stage=2, base_dir=tiny_model_dir)
    METHODS["sdft"].train(ctx, task)
    saved = load_file(str(layout.train(2, "copy") / "teacher" / "teacher.safetensors"))
    base = model.state_dict()
    assert saved and all(torch.equal(v, base[k]) for k, v in saved.items())
