"""The toy world: skills, splits, tokenizer, task loading, the cached pretrained model."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from sdft_cli.toy import world


@pytest.mark.parametrize(
    "skill,x,y",
    [
        ("rev", "abcd", "dcba"),
        ("dup", "abc", "aabbcc"),
        ("sort", "hcab", "abch"),
        ("first", "dcb", "d"),
        ("last", "dcb", "b"),
        ("rot", "abcd", "bcda"),
        ("shift", "abh", "bca"),
        ("swap", "abcde", "badce"),
        ("odd", "abcdef", "ace"),
        ("mirror", "abc", "abccba"),
        ("drop", "abc", "bc"),
    ],
)
def test_skills_on_hand_worked_examples(skill, x, y):
    assert world.SKILLS[skill](x) == y


def test_prior_and_new_skills_partition_the_skills():
    assert set(world.PRIOR_SKILLS) | set(world.NEW_SKILLS) == set(world.SKILLS)
    assert not set(world.PRIOR_SKILLS) & set(world.NEW_SKILLS)


def test_partition_covers_every_input_and_sizes_match_the_modulus():
    inputs = ["".join(p) for p in itertools.product(world.LETTERS, repeat=4)]
    parts = [world.partition(x) for x in inputs]
    assert set(parts) == {"train", "validation", "test"}
    for split, share in (("test", 1 / 16), ("validation", 1 / 16)):
        assert parts.count(split) / len(parts) == pytest.approx(share, rel=0.2)


def test_rows_are_deterministic_distinct_and_never_share_inputs_across_splits():
    splits = {s: world.rows("swap", s, 200) for s in ("train", "validation", "test")}
    assert world.rows("swap", "train", 200) == splits["train"]
    inputs = {s: {r["prompt"].split(":", 1)[1] for r in rows} for s, rows in splits.items()}
    assert all(len(v) == 200 for v in inputs.values())
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["validation"]
    assert not inputs["validation"] & inputs["test"]
    for s, rows in splits.items():
        for r in rows:
            x = r["prompt"].split(":", 1)[1]
            assert world.partition(x) == s
            y = world.SKILLS["swap"](x)
            assert r["demonstration"] == y
            assert json.loads(r["answer"]) == [y, " ".join(y)]  # either style is correct
            assert world.MIN_LEN <= len(x) <= world.MAX_LEN


def test_a_scorer_accepts_either_style_and_only_the_right_content():
    from sdft_cli.scorers import exact_match

    row = world.rows("rev", "test", 1, style="spaced")[0]
    y = world.SKILLS["rev"](row["prompt"].split(":")[1])
    assert row["demonstration"] == " ".join(y)
    assert exact_match(y, row["answer"]) == exact_match(" ".join(y), row["answer"]) == 1.0
    assert exact_match(y[:-1], row["answer"]) == 0.0


def test_nonce_names_are_never_skills():
    rng = random.Random(0)
    assert not {world.nonce_name(rng) for _ in range(5000)} & set(world.SKILLS)


def test_tokenizer_round_trips_every_character_one_token_each():
    tok = world.build_tokenizer()
    text = world.ALPHABET * 2
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_chat_rendering_and_target_through_the_task_machinery():
    from sdft_cli.prompts import encode_messages, encode_target, student_messages, teacher_messages

    tok = world.build_tokenizer()
    msgs = student_messages("rev:abc", None)
    assert tok.decode(encode_messages(tok, msgs)) == "<|user|>rev:abc<|assistant|>"
    assert tok.decode(encode_target(tok, msgs, "cba", [tok.eos_token_id])) == "cba<|end|>"
    teacher = teacher_messages("rev:abc", "cba", world.TEMPLATE, None)
    assert tok.decode(encode_messages(tok, teacher)) == "<|user|>rev:abc\nexample: cba\nanswer:<|assistant|>"


def test_toy_tasks_load_through_load_task_and_reject_unknown_skills():
    from sdft_cli.config import TaskConfig
    from sdft_cli.errors import ConfigError
    from sdft_cli.tasks import load_task

    task = load_task("odd", TaskConfig(source="toy", path="odd", max_train=10, max_test=5))
    assert len(task.train) == 10 and len(task.test) == 5
    assert task.train[0].prompt.startswith("odd:")
    assert task.test[0].demonstration in json.loads(task.test[0].answer)
    spaced = load_task("odd", TaskConfig(source="toy", path="odd", subset="spaced", max_train=5))
    assert [ex.demonstration for ex in spaced.train] == [" ".join(ex.demonstration) for ex in task.train[:5]]
    with pytest.raises(ConfigError, match="demonstration style"):
        load_task("x", TaskConfig(source="toy", path="odd", subset="bold"))
    val = load_task("odd", TaskConfig(source="toy", path="odd", test_split="validation"), train=False)
    assert len(val.test) == world.DEFAULT_ROWS["validation"]
    with pytest.raises(ConfigError, match="no toy-world skill 'nope'"):
        load_task("x", TaskConfig(source="toy", path="nope"))
    with pytest.raises(ConfigError, match="toy-world splits"):
        load_task("x", TaskConfig(source="toy", path="odd", test_split="dev"), train=False)


def test_pretraining_is_cached_by_its_config(offline_env, tmp_path):
    """A few steps of the real recipe: builds a loadable HF directory once, keyed by the config hash."""
    from sdft_cli.config import ToyWorldConfig
    from sdft_cli.models import load_model, load_tokenizer
    from sdft_cli.toy import pretrain

    cfg = ToyWorldConfig(
        hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32, steps=3, batch_size=4
    )
    key = pretrain.cache_key(cfg)
    assert key != pretrain.cache_key(ToyWorldConfig(**{**cfg.__dict__, "steps": 4}))
    out = pretrain.build(tmp_path / key, cfg, log=lambda *_: None)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain.build(tmp_path / key, cfg, log=lambda *_: None) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    model, tok = load_model(out), load_tokenizer(out)
    assert model.config.vocab_size == len(tok) and tok.decode(tok("rev:ab")["input_ids"]) == "rev:ab"


def test_unknown_prior_skill_is_a_config_error():
    from sdft_cli.config import ToyWorldConfig
    from sdft_cli.errors import ConfigError
    from sdft_cli.toy import pretrain

    with pytest.raises(ConfigError, match=r"model.toy.prior_skills: unknown skills \['nope'\]"):
        pretrain.check(ToyWorldConfig(prior_skills=["rev", "nope"]))


def test_preconditions_need_a_demonstration_in_every_test_row():
    from sdft_cli.config import TaskConfig
    from sdft_cli.errors import DataError
    from sdft_cli.tasks import Example, Task, check_demonstrations

    ok = Task("a", TaskConfig(path="a"), test=[Example(0, "p", "d", "x")])
    bad = Task("b", TaskConfig(path="b"), test=[Example(0, "p", "d", "x"), Example(1, "p", None, "x")])
    check_demonstrations([ok])
    with pytest.raises(DataError, match="task b: test row 1 has no demonstration"):
        check_demonstrations([ok, bad])
