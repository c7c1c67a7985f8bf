"""Each training method as a function over artifacts, on the tiny model: it trains, logs and saves."""

import copy
import json

import pytest
import torch

from sdft_cli.artifacts import RunLayout, is_complete
from sdft_cli.config import LoggerConfig, RolloutConfig, SDFTConfig, SFTConfig, TaskConfig
from sdft_cli.logger import RunLogger
from sdft_cli.methods import METHODS
from sdft_cli.methods.context import TrainContext
from sdft_cli.tasks import load_task


@pytest.mark.parametrize("method", ["sdft", "sft"])
def test_one_task_trains_logs_and_saves(method, tiny_model, copy_task_dir, tmp_path):
    model, tok = tiny_model
    student = copy.deepcopy(model)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    cfg = (SDFTConfig if method == "sdft" else SFTConfig)(prompts_per_step=2, micro_batch_size=1, max_steps=3)
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-3, 0
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir), max_new_tokens=6))
    layout = RunLayout(tmp_path)
    ctx = TrainContext(
        model=student,
        tokenizer=tok,
        method=cfg,
        rollout=RolloutConfig(dtype="float32"),
        autocast_dtype=None,
        eos_ids=[tok.eos_token_id],
        seed=0,
        stage=1,
        train_dir=layout.train(1, "copy"),
        logger=RunLogger(LoggerConfig(), layout, {}, "t"),
        progress=False,
    )
    out = METHODS[method](ctx, task)

    assert out == layout.model(1, "copy") and (out / "model.safetensors").is_file()
    assert is_complete(layout.train(1, "copy")) and not (layout.train(1, "copy") / "checkpoints").exists()
    changed = sum(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert changed >= len(before) // 2
    records = [json.loads(line) for line in layout.metrics_log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    key = "train/forward_kl" if method == "sdft" else "train/nll"
    assert all(r[key] >= 0 and r["train/loss"] >= 0 for r in records)
    assert all(r["time/step"] > 0 for r in records)
    if method == "sdft":
        samples = [json.loads(line) for line in ctx.samples_log.read_text().splitlines()]
        assert [s["step"] for s in samples] == [1, 1, 2, 2, 3, 3] and all("completion" in s for s in samples)


def test_sft_loss_is_the_demonstration_nll(tiny_model, copy_task_dir, tmp_path):
    """At lr -> 0 the first logged SFT loss equals a brute-force NLL of prompt + demonstration."""
    from sdft_cli.tasks import encode_messages, encode_target, student_messages
    from sdft_cli.update import batch_indices

    model, tok = tiny_model
    student = copy.deepcopy(model)
    cfg = SFTConfig(prompts_per_step=2, micro_batch_size=2, max_steps=1)
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-12, 0
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir)))
    layout = RunLayout(tmp_path)
    ctx = TrainContext(
        model=student,
        tokenizer=tok,
        method=cfg,
        rollout=RolloutConfig(),
        autocast_dtype=None,
        eos_ids=[tok.eos_token_id],
        seed=3,
        stage=1,
        train_dir=layout.train(1, "copy"),
        logger=RunLogger(LoggerConfig(), layout, {}, "t"),
        progress=False,
    )
    METHODS["sft"](ctx, task)
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
