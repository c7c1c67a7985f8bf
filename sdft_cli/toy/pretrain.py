"""Pretraining the toy world's base model from scratch: prior skills plus the use of a demonstration.

The mix per batch: prior skills from the student prompt alone, prior skills in the teacher template,
and made-up skill names in the teacher template whose answer is the demonstration's content. The last
part is the in-context ability SDFT relies on: shown a demonstration for a skill it has never seen, the
model answers with it. Demonstrations in the teacher template come in either style (plain or spaced);
the answer is always plain, the model's own style (world.py). New tasks are never shown, so the base
student cannot do them and its teacher can. The model is a standard Llama saved in Hugging Face
format, cached by a hash of its config.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock

from sdft_cli.artifacts import atomic_dir
from sdft_cli.builders import llama_config
from sdft_cli.config import ToyWorldConfig
from sdft_cli.errors import ConfigError
from sdft_cli.prompts import encode_messages, encode_target, student_messages, teacher_messages
from sdft_cli.toy import world

# Bumped when the world or the pretraining recipe changes, so cached models are rebuilt.
VERSION = 2


def cache_key(cfg: ToyWorldConfig) -> str:
    blob = json.dumps({"version": VERSION, **asdict(cfg)}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def check(cfg: ToyWorldConfig) -> None:
    unknown = [s for s in cfg.prior_skills if s not in world.SKILLS]
    if unknown:
        raise ConfigError(
            f"model.toy.prior_skills: unknown skills {unknown} (available: {', '.join(world.SKILLS)})"
        )
    if cfg.hidden_size % cfg.num_heads:
        raise ConfigError("model.toy.hidden_size must be divisible by model.toy.num_heads")


def sample_example(
    rng: random.Random, cfg: ToyWorldConfig, tok, eos: list[int]
) -> tuple[list[int], list[int]]:
    """One (context ids, target ids) pair of the pretraining mix."""
    r = rng.random()
    if r < cfg.nonce_fraction:
        name = world.nonce_name(rng)
        x = world.random_input(rng)
        n = rng.randint(1, 2 * world.MAX_LEN)
        demo = "".join(rng.choice(world.LETTERS) for _ in range(n))
        p, with_demo = world.prompt(name, x), True
    else:
        skill = rng.choice(list(cfg.prior_skills))
        x = world.random_input(rng)
        demo = world.SKILLS[skill](x)
        p, with_demo = world.prompt(skill, x), r < cfg.nonce_fraction + cfg.demo_fraction
    shown = world.styled(demo, rng.choice(world.STYLES))
    msgs = teacher_messages(p, shown, world.TEMPLATE, None) if with_demo else student_messages(p, None)
    return encode_messages(tok, msgs), encode_target(tok, msgs, demo, eos)


def batch(rng: random.Random, cfg: ToyWorldConfig, tok, eos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [sample_example(rng, cfg, tok, eos) for _ in range(cfg.batch_size)]
    length = max(len(c) + len(t) for c, t in pairs)
    ids = torch.full((len(pairs), length), tok.pad_token_id)
    labels = torch.full((len(pairs), length), -100)
    for i, (c, t) in enumerate(pairs):
        ids[i, : len(c) + len(t)] = torch.tensor(c + t)
        labels[i, len(c) : len(c) + len(t)] = torch.tensor(t)
    return ids, labels


def pretrain(cfg: ToyWorldConfig, log=print):
    """Train the base model from scratch; returns (model, tokenizer, stats)."""
    from transformers import LlamaForCausalLM

    check(cfg)
    tok = world.build_tokenizer()
    eos = [tok.eos_token_id]
    config = llama_config(cfg, tok)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, cfg.steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0, losses = time.time(), []
    for step in range(cfg.steps):
        ids, labels = batch(rng, cfg, tok, eos)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            recent = sum(losses[-50:]) / len(losses[-50:])
            elapsed = time.time() - t0
            log(f"toy world pretraining: step {step + 1}/{cfg.steps} loss {recent:.4f} ({elapsed:.0f}s)")
    model.eval()
    stats = {"steps": cfg.steps, "seconds": round(time.time() - t0, 1), "final_loss": sum(losses[-50:]) / 50}
    return model, tok, stats


def build(out: Path, cfg: ToyWorldConfig, log=print) -> Path:
    """The pretrained base model in ``out`` (a Hugging Face directory), built once."""
    if (out / "config.json").is_file():
        return out
    check(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "config.json").is_file():
            return out
        log(f"toy world: pretraining the base model into {out} (once; cached by its config)")
        model, tok, stats = pretrain(cfg, log)
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "pretrain.json").write_text(json.dumps({"config": asdict(cfg), **stats}, indent=2))
    return out
