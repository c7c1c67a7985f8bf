"""The paper's baselines beyond SFT: several rollouts per prompt (App. A.1), offline distillation on a
fixed set of teacher outputs and SFT on teacher outputs (Fig. 6), SFT's token-mean aggregation (TRL's),
and the paper's configs for every method."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import train_context

from sdft_cli import teacher_set
from sdft_cli.artifacts import RunLayout, read_manifest
from sdft_cli.config import RolloutConfig, TaskConfig
from sdft_cli.errors import ConfigError
from sdft_cli.evaluate import evaluate_many
from sdft_cli.methods import METHODS
from sdft_cli.names import resolve_teacher_template
from sdft_cli.tasks import Task, load_task


def _task(copy_task_dir):
    return load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=6))


def _train(method, model, tok, task, out, rollout=None, **options):
    cfg = METHODS[method].schema(prompts_per_step=2, micro_batch_size=1, max_steps=3, loss_chunk_size=5)
    for k, v in options.items():
        setattr(cfg, k, v)
    cfg.__post_init__()
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
    student = copy.deepcopy(model)
    layout = RunLayout(out)
    ctx = train_context(student, tok, cfg, layout, rollout=rollout)
    METHODS[method].train(ctx, task)
    records = [json.loads(x) for x in layout.metrics_log.read_text().splitlines()]
    samples = (
        [json.loads(x) for x in ctx.samples_log.read_text().splitlines()] if ctx.samples_log.exists() else []
    )
    return student, records, samples, layout.train(1, "copy")


def test_greedy_duplicate_rollouts_train_exactly_as_one(tiny_model, copy_task_dir, tmp_path):
    """Two greedy rollouts per prompt are the same completion twice: the mean over the step's sequences
    (or tokens) must give the same loss and update as one rollout per prompt, while the step really
    scores twice the sequences."""
    model, tok = tiny_model
    task, greedy = _task(copy_task_dir), RolloutConfig(dtype="float32", temperature=0.0)
    for aggregation in ("seq_mean", "token_mean"):
        runs = {}
        for n in (1, 2):
            runs[n] = _train(
                "sdft",
                model,
                tok,
                task,
                tmp_path / f"{aggregation}{n}",
                rollout=greedy,
                rollouts_per_prompt=n,
                aggregation=aggregation,
                log_samples=8,
            )
        (w1, r1, s1, _), (w2, r2, s2, _) = runs[1], runs[2]
        assert [r["train/loss"] for r in r1] == pytest.approx(
            [r["train/loss"] for r in r2], rel=1e-5, abs=2e-6
        )
        assert all(torch.allclose(w1.state_dict()[k], v, atol=1e-6) for k, v in w2.state_dict().items())
        # each prompt's two rollouts sit side by side in the step
        step1 = [s["row"] for s in s2 if s["step"] == 1]
        assert len(step1) == 4 and step1[0::2] == step1[1::2] == [s["row"] for s in s1 if s["step"] == 1]


def test_offline_distillation_trains_on_one_fixed_set_of_teacher_samples(tiny_model, copy_task_dir, tmp_path):
    model, tok = tiny_model
    task = _task(copy_task_dir)
    rollout = RolloutConfig(dtype="float32", temperature=1.0)
    student, records, samples, train_dir = _train(
        "offline_distill",
        model,
        tok,
        task,
        tmp_path / "od",
        rollout=rollout,
        rollouts_per_prompt=2,
        log_samples=8,
    )
    fixed = teacher_set.load(teacher_set.path(train_dir))
    manifest = read_manifest(teacher_set.path(train_dir))
    assert manifest["generations"] == 2 * len(task.train) == len(fixed.completions)
    rows = [json.loads(x) for x in (teacher_set.path(train_dir) / teacher_set.FILE).read_text().splitlines()]
    assert [(r["row"], r["sample"]) for r in rows] == [
        (i, k) for i in range(len(task.train)) for k in range(2)
    ]
    # every step's completions are entries of the set, a prompt's two samples side by side; nothing new
    for s in samples:
        assert s["completion"] in {fixed.texts[s["row"] * 2], fixed.texts[s["row"] * 2 + 1]}
    assert "train/is_mean" not in records[0]  # no importance weights when the teacher samples
    assert sum(not torch.equal(v, model.state_dict()[k]) for k, v in student.state_dict().items()) > 0
    # a task resumed (or re-run) keeps its set: the set is not sampled again
    before = (teacher_set.path(train_dir) / teacher_set.FILE).read_bytes()
    engine_calls = []

    class Refuse:  # an engine that must not be built: the complete set is read back
        def __init__(self):
            engine_calls.append("built")

    again = teacher_set.build(train_dir, Refuse, None, [], None, per_prompt=2, seed=0, stage=1)
    assert engine_calls == [] and again.texts == fixed.texts
    assert (teacher_set.path(train_dir) / teacher_set.FILE).read_bytes() == before
    with pytest.raises(ConfigError, match="teacher_samples=fixed"):
        METHODS["sdft"].schema(teacher_samples="fixed")
    with pytest.raises(ConfigError, match="method.teacher=frozen"):
        METHODS["offline_distill"].schema(teacher="ema")


def test_sft_on_teacher_outputs_imitates_the_teachers_own_completions(tiny_model, copy_task_dir, tmp_path):
    """Greedy sampling makes the set checkable: it equals the starting model's greedy decoding of the
    teacher contexts (prompt + demonstration), and SFT's targets are those completions."""
    model, tok = tiny_model
    task = _task(copy_task_dir)
    rollout = RolloutConfig(dtype="float32", temperature=0.0, max_new_tokens=6)
    student, records, _, train_dir = _train("sft_teacher", model, tok, task, tmp_path / "st", rollout=rollout)
    fixed = teacher_set.load(teacher_set.path(train_dir))
    from conftest import hf_engine

    as_test = Task(name="copy", cfg=task.cfg, test=task.train)
    template = resolve_teacher_template(None, task.cfg.teacher_template)
    reference = evaluate_many(
        hf_engine(copy.deepcopy(model).eval(), tok), tok, [as_test], teacher_template=template
    )
    assert fixed.texts == [p["prediction"] for p in reference[0].predictions]
    from sdft_cli.schedule import batch_indices

    for r in records:  # each step's targets are its rows' teacher completions
        rows = batch_indices(len(task.train), 2, r["step"] - 1, (0, 1))
        assert r["train/completion_len_mean"] == sum(len(fixed.completions[i]) for i in rows) / 2
    assert all(r["train/nll"] > 0 for r in records)


def test_sft_averages_over_the_steps_tokens_like_trl(tiny_model, tmp_path):
    """token_mean (SFT's default): the loss is the NLL summed over every target token of the step divided
    by their number; seq_mean weighs a short demonstration's tokens more. Brute force on one step."""
    from conftest import write_jsonl

    from sdft_cli.prompts import encode_messages, encode_target

    model, tok = tiny_model
    rows = [{"prompt": "Say a", "demonstration": "a", "answer": "a"}]
    rows.append({"prompt": "Say many", "demonstration": "b c d e f g h", "answer": "b"})
    write_jsonl(tmp_path / "t" / "train.jsonl", rows)
    write_jsonl(tmp_path / "t" / "test.jsonl", rows)
    task = load_task("copy", TaskConfig(source="json", path=str(tmp_path / "t"), max_new_tokens=6))
    assert METHODS["sft"].schema().aggregation == "token_mean"
    nll = []
    for ex in task.train:
        ctx_ids = encode_messages(tok, task.student(ex))
        target = encode_target(tok, task.student(ex), ex.demonstration, [tok.eos_token_id])
        ids = torch.tensor([ctx_ids + target])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(ctx_ids) - 1 : -1].float(), -1)
        nll.append(-logp.gather(-1, torch.tensor(target).unsqueeze(-1)).squeeze(-1))
    want = {
        "token_mean": float(torch.cat(nll).mean()),
        "seq_mean": float(torch.stack([x.mean() for x in nll]).mean()),
    }
    assert abs(want["token_mean"] - want["seq_mean"]) > 1e-3
    for aggregation, value in want.items():
        cfg = METHODS["sft"].schema(
            prompts_per_step=2, micro_batch_size=1, max_steps=1, aggregation=aggregation
        )
        layout = RunLayout(tmp_path / aggregation)
        METHODS["sft"].train(train_context(copy.deepcopy(model), tok, cfg, layout), task)
        record = json.loads(layout.metrics_log.read_text().splitlines()[0])
        assert record["train/loss"] == pytest.approx(value, rel=1e-4)


def test_the_official_left_truncation_keeps_each_training_contexts_last_tokens(
    tiny_model, tmp_path, monkeypatch
):
    """method.max_prompt_tokens=K: every student and teacher context the loss reads is its last K tokens;
    without it, a context longer than the model's is refused before any work, naming the row."""
    from conftest import write_jsonl

    from sdft_cli.errors import DataError
    from sdft_cli.methods import sdft
    from sdft_cli.prompts import encode_messages, left_truncate
    from sdft_cli.tasks import check_lengths

    assert left_truncate([1, 2, 3, 4], 2) == [3, 4] and left_truncate([1, 2], 5) == [1, 2]
    assert left_truncate([1, 2, 3], None) == [1, 2, 3]
    model, tok = tiny_model
    long = "Some tool documentation. " * 6
    rows = [{"prompt": f"{long}Repeat: {w}", "demonstration": w, "answer": w} for w in ("apple", "river")]
    write_jsonl(tmp_path / "t" / "train.jsonl", rows)
    write_jsonl(tmp_path / "t" / "test.jsonl", [{"prompt": "Repeat: x", "answer": "x"}])
    task = load_task("copy", TaskConfig(source="json", path=str(tmp_path / "t"), max_new_tokens=4))
    n = len(encode_messages(tok, task.student(task.train[0])))
    assert n > 100 and len(task.train) == 2, (n, len(task.train))
    template = resolve_teacher_template("paper", None)
    with pytest.raises(DataError, match="train row 0: prompt is"):
        check_lengths(task, tok, 100, 4, template)
    assert check_lengths(task, tok, 100, 4, template, max_prompt=48) == 4  # 2 student + 2 teacher contexts

    seen = []
    real = sdft.completion_hidden

    def spy(model_, contexts, *args, **kwargs):
        seen.extend(len(c) for c in contexts)
        return real(model_, contexts, *args, **kwargs)

    monkeypatch.setattr(sdft, "completion_hidden", spy)
    _train("sdft", model, tok, task, tmp_path / "cut", max_prompt_tokens=48, max_steps=1)
    assert seen and all(x == 48 for x in seen)  # both contexts of both rows, cut to their last 48 tokens
