"""Bad task files and rows, tried systematically: every bad file, row or cell, and every prompt too long
for the context, is one DataError whose one-line message names the task, the file and the row or line,
before any model is built; never a Python exception from inside. (Config overrides: test_bad_input.py.)

Property tests call the loading entry points directly; examples are derandomized so that CI sees the
same ones every time.
"""

from __future__ import annotations

import json
import math
from itertools import count
from pathlib import Path

import pytest
from conftest import assert_names, write_jsonl
from hypothesis import given
from hypothesis import strategies as st
from test_bad_input import FAST

from sdft_cli.config import TaskConfig
from sdft_cli.errors import DataError
from sdft_cli.prompts import encode_messages
from sdft_cli.tasks import Example, Task, check_lengths, load_task

# ----------------------------------------------------------------------------- task files

GOOD_TEXT = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())
_dirs = count()


def task_dir(root: Path) -> Path:
    """A fresh directory per example: `datasets` caches a file's rows by path and modification time."""
    d = root / f"ex{next(_dirs)}"
    d.mkdir(parents=True)
    return d


def good_rows(n: int, test: bool = False) -> list[dict]:
    return [{"prompt": f"Say {i}", "answer" if test else "demonstration": str(i)} for i in range(n)]


def json_task(root: Path, train: bytes | list[dict], test: bytes | list[dict] | None = None) -> TaskConfig:
    d = task_dir(root)
    for split, content in (("train", train), ("test", good_rows(2, True) if test is None else test)):
        if isinstance(content, bytes):
            (d / f"{split}.jsonl").write_bytes(content)
        else:
            write_jsonl(d / f"{split}.jsonl", content)
    return TaskConfig(source="json", path=str(d))


# A cell that is not a usable prompt or demonstration: missing, empty, whitespace, null, NaN, or not text.
BAD_CELLS = st.one_of(
    st.just("<missing>"),
    st.text(alphabet=" \t\n\r\u00a0\u2003", max_size=5),
    st.none(),
    st.just(math.nan),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@FAST
@given(st.integers(1, 6), st.data(), st.sampled_from(["prompt", "demonstration"]), BAD_CELLS)
def test_a_bad_cell_names_the_task_file_row_and_column(tmp_path, n, data, column, cell):
    rows = good_rows(n)
    i = data.draw(st.integers(0, n - 1), label="row")
    if cell == "<missing>":
        del rows[i][column]
    else:
        rows[i][column] = cell
    d = task_dir(tmp_path)
    (d / "train.jsonl").write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in rows))
    write_jsonl(d / "test.jsonl", good_rows(1, True))
    with pytest.raises(DataError) as e:
        load_task("mytask", TaskConfig(source="json", path=str(d)))
    assert_names(e, "task mytask:", str(d / "train.jsonl"), f"row {i}", repr(column))


@FAST
@given(st.lists(st.tuples(GOOD_TEXT, GOOD_TEXT), min_size=1, max_size=5))
def test_any_nonblank_text_loads_unchanged(tmp_path, pairs):
    """No false alarms: unicode, braces, control characters and NUL are text like any other."""
    rows = [{"prompt": p, "demonstration": d} for p, d in pairs]
    task = load_task("t", json_task(tmp_path, rows))
    assert [(ex.prompt, ex.demonstration) for ex in task.train] == pairs


@FAST
@given(st.integers(1, 6), st.data(), st.binary(min_size=1, max_size=3).filter(lambda b: not _utf8(b)))
def test_non_utf8_bytes_name_the_file_and_line(tmp_path, n, data, junk):
    lines = [json.dumps(r).encode() for r in good_rows(n)]
    i = data.draw(st.integers(0, n - 1), label="line index")
    lines[i] = lines[i][:10] + junk + lines[i][10:]
    cfg = json_task(tmp_path, b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as e:
        load_task("t", cfg)
    assert_names(e, str(Path(cfg.path) / "train.jsonl"), f"line {i + 1}", "not UTF-8")


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


INVALID_LINES = st.one_of(
    st.sampled_from(["{", '{"prompt": "a"', "{'prompt': 'a'}", '{"prompt": "a",}', "prompt=a", '{"a": 1} x']),
    st.sampled_from(['"just text"', "5", "[1, 2]", "null", "true"]),  # JSON, but not an object of columns
    st.just('{"prompt": "a", "prompt": "b", "demonstration": "c"}'),  # a key twice
)


@FAST
@given(st.integers(1, 6), st.data(), INVALID_LINES)
def test_a_line_that_is_not_a_json_object_names_the_file_and_line(tmp_path, n, data, bad):
    lines = [json.dumps(r) for r in good_rows(n)]
    i = data.draw(st.integers(0, n), label="line index")
    lines.insert(i, bad)
    cfg = json_task(tmp_path, ("\n".join(lines) + "\n").encode())
    with pytest.raises(DataError) as e:
        load_task("t", cfg)
    assert_names(e, str(Path(cfg.path) / "train.jsonl"), f"line {i + 1}")


@FAST
@given(st.text(alphabet=" \t\r\n", max_size=6), st.sampled_from(["train", "test"]))
def test_an_empty_file_names_the_file(tmp_path, blank, split):
    content = blank.encode()
    cfg = json_task(tmp_path, content) if split == "train" else json_task(tmp_path, good_rows(2), content)
    with pytest.raises(DataError) as e:
        load_task("t", cfg)
    assert_names(e, str(Path(cfg.path) / f"{split}.jsonl"), "empty")


@FAST
@given(st.binary(max_size=60) | st.text(max_size=60).map(str.encode))
def test_any_file_content_loads_or_is_one_data_error(tmp_path, content):
    try:
        load_task("t", json_task(tmp_path, content))
    except DataError as e:
        assert "\n" not in str(e) and "task t:" in str(e)


def test_a_lone_surrogate_escape_is_a_data_error(tmp_path):
    r"""`"\ud800"` is valid JSON but no Unicode text."""
    cfg = json_task(tmp_path, b'{"prompt": "a\\ud800", "demonstration": "x"}\n')
    with pytest.raises(DataError) as e:
        load_task("t", cfg)
    assert_names(e, str(Path(cfg.path) / "train.jsonl"))


@FAST
@given(
    st.lists(
        st.one_of(
            st.none(),
            st.integers(),
            st.text(max_size=5),
            st.lists(st.integers(), max_size=2),
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": st.none() | st.integers()}
            ),
        ),
        max_size=3,
    )
)
def test_a_malformed_released_row_is_a_data_error_naming_the_row(tmp_path, messages):
    """`format: sciknoweval` rows carry chat messages; a malformed list is refused, not a TypeError."""
    rows = [{"messages": [{"role": "user", "content": "q"}], "output_text": "a"}, {"messages": messages}]
    cfg = json_task(tmp_path, rows, [{"prompt": "q", "answer": "A"}])
    cfg.format = "sciknoweval"
    with pytest.raises(DataError) as e:
        load_task("sci", cfg)
    assert_names(e, "task sci:", str(Path(cfg.path) / "train.jsonl"), "row 1")


def test_rows_named_by_their_place_in_the_file_after_a_sample_shuffle(tmp_path):
    rows = good_rows(20)
    rows[13]["demonstration"] = " "
    cfg = json_task(tmp_path, rows)
    cfg.sample_seed = 3
    with pytest.raises(DataError) as e:
        load_task("t", cfg)
    assert_names(e, "row 13 has an empty 'demonstration'")


@FAST
@given(st.lists(st.integers(1, 300), min_size=1, max_size=4), st.integers(8, 400), st.integers(1, 64))
def test_a_prompt_longer_than_the_context_names_the_first_row_that_does_not_fit(
    tiny_tokenizer, lengths, context, new_tokens
):
    cfg = TaskConfig(source="json", path="unused", max_new_tokens=new_tokens)
    train = [Example(i, "x" * n, "d", None) for i, n in enumerate(lengths)]
    task = Task("long", cfg, train, [])
    sizes = [len(encode_messages(tiny_tokenizer, task.student(ex))) for ex in train]
    too_long = [i for i, n in enumerate(sizes) if n > context - new_tokens]
    if not too_long:
        check_lengths(task, tiny_tokenizer, context, new_tokens)
        return
    with pytest.raises(DataError) as e:
        check_lengths(task, tiny_tokenizer, context, new_tokens)
    i = too_long[0]
    assert_names(e, f"task long: train row {i}: prompt is {sizes[i]} tokens", f"context of {context}")


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    from sdft_cli.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)
