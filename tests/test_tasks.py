"""Task loading, validation errors that name the row, templates, and the bundled data."""

import subprocess
import sys

import pytest
from conftest import REPO, write_jsonl

from sdft_cli.config import TaskConfig
from sdft_cli.errors import ConfigError, DataError
from sdft_cli.names import TEACHER_TEMPLATES, resolve_teacher_template
from sdft_cli.prompts import encode_messages, encode_target, fill_template, teacher_messages
from sdft_cli.rows import bundled_tasks
from sdft_cli.tasks import Task, check_lengths, load_task


def test_bundled_tasks_load_and_have_demonstrations():
    assert {"facts", "mcq", "toolcall", "capitals", "opposites", "languages"} <= set(bundled_tasks())
    for name in ("facts", "mcq", "toolcall"):
        task = load_task(name, TaskConfig(source="bundled", path=name, val_split="validation"))
        assert len(task.train) >= 40 and len(task.test) >= 24 and len(task.val) >= 16
        assert all(ex.demonstration for ex in task.train) and all(ex.answer for ex in task.test + task.val)
        # settings are chosen on validation: no validation or test question is a training question,
        # and validation and test share none
        train, test, val = ({ex.prompt for ex in rows} for rows in (task.train, task.test, task.val))
        assert not (train & test or train & val or test & val), name


def test_bundled_data_is_reproducible():
    out = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_bundled_tasks.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout


def test_local_json_task(copy_task_dir):
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir / "{split}.jsonl")))
    assert [ex.prompt for ex in task.train][:2] == ["Repeat: apple", "Repeat: river"]
    assert len(task.test) == 2 and task.test[0].answer == "maple"


def test_csv_task_with_column_mapping(tmp_path):
    for split in ("train", "test"):
        (tmp_path / f"{split}.csv").write_text("q,demo,gold\nWhat is 1+1?,2,2\nWhat is 2+2?,4,4\n")
    cfg = TaskConfig(source="csv", path=str(tmp_path))
    cfg.columns.prompt, cfg.columns.demonstration, cfg.columns.answer = "q", "demo", "gold"
    task = load_task("sums", cfg)
    assert task.train[1].prompt == "What is 2+2?" and task.train[1].demonstration == "4"


def test_row_without_demonstration_names_task_file_and_row(tmp_path):
    write_jsonl(
        tmp_path / "train.jsonl",
        [{"prompt": "a", "demonstration": "x"}, {"prompt": "b", "demonstration": " "}],
    )
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "a", "answer": "x"}])
    with pytest.raises(DataError, match=r"task bad: .*train.jsonl row 1 has an empty 'demonstration'"):
        load_task("bad", TaskConfig(source="json", path=str(tmp_path)))


def test_missing_column_and_missing_file(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "demonstration": "x"}])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "a", "answer": "x"}])
    with pytest.raises(DataError, match=r"row 0 has no column 'prompt'"):
        load_task("bad", TaskConfig(source="json", path=str(tmp_path)))
    with pytest.raises(DataError, match="test split file not found"):
        load_task("gone", TaskConfig(source="json", path=str(tmp_path / "nothing")), train=False)
    with pytest.raises(ConfigError, match="no bundled data set 'nope'"):
        load_task("nope", TaskConfig(source="bundled", path="nope"))


def test_prompt_longer_than_context_is_one_clear_error(tiny_model, copy_task_dir):
    _, tok = tiny_model
    task = load_task("copy", TaskConfig(source="json", path=str(copy_task_dir)))
    check_lengths(task, tok, context=1024, rollout_tokens=16, template=TEACHER_TEMPLATES["paper"])
    with pytest.raises(DataError, match=r"task copy: train row 0: prompt is \d+ tokens; the context of 40"):
        check_lengths(task, tok, context=40, rollout_tokens=16)
    with pytest.raises(DataError, match=r"task copy: test row 0: prompt is \d+ tokens"):
        # test prompts are checked against the task's own max_new_tokens (64), not the rollout cap
        check_lengths(Task("copy", task.cfg, [], task.test), tok, context=90, rollout_tokens=1)
    with pytest.raises(DataError, match=r"teacher context is \d+ tokens"):
        # the student prompt fits, the teacher context (prompt + demonstration + template) does not
        check_lengths(Task("copy", task.cfg, task.train[:1], []), tok, 100, 16, TEACHER_TEMPLATES["paper"])


def test_templates_fill_without_touching_braces():
    filled = fill_template(TEACHER_TEMPLATES["paper"], 'Return {"a": 1}', "{demonstration} stays")
    assert 'Return {"a": 1}' in filled and "{demonstration} stays" in filled
    assert filled.startswith("\n") and filled.endswith("including the thinking process.\n")
    msgs = teacher_messages("Q?", "A.", TEACHER_TEMPLATES["nothink"], system="sys")
    assert msgs[0] == {"role": "system", "content": "sys"} and msgs[1]["content"].endswith("of your own.")


def test_turn_templates_are_conversations(tiny_model):
    """{turn} splits a template into user / assistant / user turns: the demonstration becomes the
    assistant's earlier answer, rendered by the chat template as one."""
    _, tok = tiny_model
    msgs = teacher_messages("Q?", "A {turn} stays.", TEACHER_TEMPLATES["example_turn"], system="sys")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"] == "Example question:\nQ?" and msgs[3]["content"] == "Q?"
    assert msgs[2]["content"] == "A {turn} stays."  # a marker inside the demonstration is text
    ids = encode_messages(tok, msgs)
    assert tok.decode(ids).count("A {turn} stays.") == 1
    with pytest.raises(ConfigError, match=r"must be even; got 1"):
        resolve_teacher_template("{prompt}{turn}{demonstration}", None)


def test_teacher_template_precedence_and_validation():
    assert resolve_teacher_template(None, None) == TEACHER_TEMPLATES["paper"]
    assert resolve_teacher_template(None, "nothink") == TEACHER_TEMPLATES["nothink"]
    assert resolve_teacher_template("paper_printed", "nothink") == TEACHER_TEMPLATES["paper_printed"]
    assert (
        resolve_teacher_template("Q: {prompt} A: {demonstration}", None) == "Q: {prompt} A: {demonstration}"
    )
    with pytest.raises(ConfigError, match=r"teacher_template .* \{demonstration\}"):
        resolve_teacher_template("only {prompt}", None)


def test_sft_target_is_the_assistant_turn_of_the_chat_template(tiny_model):
    _, tok = tiny_model
    msgs = [{"role": "user", "content": "Say hi"}]
    target = encode_target(tok, msgs, "hi there", [tok.eos_token_id])
    assert tok.decode(target[:-1]) == "hi there" and target[-1] == tok.eos_token_id
    # prompt + target is exactly the rendered conversation up to the end-of-turn token
    full = tok(
        tok.apply_chat_template([*msgs, {"role": "assistant", "content": "hi there"}], tokenize=False),
        add_special_tokens=False,
    )["input_ids"]
    from sdft_cli.prompts import encode_messages

    assert full[: len(encode_messages(tok, msgs)) + len(target)] == encode_messages(tok, msgs) + target


def test_sft_demonstration_longer_than_the_context_is_caught(tiny_model, tmp_path):
    _, tok = tiny_model
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "demonstration": "x" * 200}])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": "p", "answer": "x"}])
    task = load_task("long", TaskConfig(source="json", path=str(tmp_path)))
    check_lengths(task, tok, context=300, rollout_tokens=16)  # SDFT never trains on the demonstration
    with pytest.raises(DataError, match=r"train row 0: prompt \+ demonstration is \d+ tokens"):
        check_lengths(task, tok, context=150, rollout_tokens=16, target_eos=[tok.eos_token_id])
