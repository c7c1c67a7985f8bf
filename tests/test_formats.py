"""The paper's row formats on small fixture files (tests/fixtures, made by us in the released formats):
the student and teacher contexts equal the official code's, written out here from paper.md Sec. 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SMOKE, sdft

from sdft_cli.config import TaskConfig
from sdft_cli.errors import DataError
from sdft_cli.names import TEACHER_TEMPLATES
from sdft_cli.scorers import answer_tag, tool_call
from sdft_cli.tasks import load_task

FIXTURES = Path(__file__).parent / "fixtures"

# paper.md Sec. 2.2, the official string.Template, written with explicit newlines
OFFICIAL_TEACHER = (
    "\n{orig}\n\nThis is an example for a response to the question:\n{output}\n\n"
    "Now answer with a response of your own, including the thinking process.\n"
)
# paper.md Sec. 2.3, the ToolAlpaca user prompt (the first line ends with a space)
WEATHER_PROMPT = """Your task is to answer the user's question using available tools. 
You have access to the following tools:
Name: WeatherNow
Description: Current weather by city.
Documentation:
getWeather: Get the weather.
Parameters: {"city": "Required. string. The city name."}
Output: the weather.

Use the following format:
Thought: you should always think about what to do
Action: the action to take, should be one of the tool names.
Action Input: the input to the action, must be in JSON format. All of the action input must be realistic and from the user.

Begin!
Question: What's the weather in Lyon?"""  # noqa: W291, E501
SCIENCE_SYSTEM = """
Given a question and four options, please select the right answer. Respond in the following format:
<reasoning>
...
</reasoning>
<answer>
...
</answer>

For the answer, only output the letter corresponding to the correct option (A, B, C, or D), and nothing else. Do not restate the answer text. For example, if the answer is "A", just output:
<answer>
A
</answer>"""  # noqa: E501


def task(fmt: str, scorer: str):
    cfg = TaskConfig(
        source="json", path=str(FIXTURES / fmt), format=fmt, scorer=scorer, teacher_template="paper"
    )
    return load_task(fmt, cfg)


def test_toolalpaca_contexts_match_the_official_code():
    t = task("toolalpaca", "tool_call")
    ex = t.train[0]
    assert t.student(ex) == [{"role": "user", "content": WEATHER_PROMPT}]
    response = 'Thought: I need the weather for Lyon.\nAction: getWeather\nAction Input: {"city": "Lyon"}'
    assert ex.demonstration == response
    assert t.teacher(ex, TEACHER_TEMPLATES["paper"]) == [
        {"role": "user", "content": OFFICIAL_TEACHER.format(orig=WEATHER_PROMPT, output=response)}
    ]
    assert len(t.train) == 2 and len(t.test) == 2


def test_toolalpaca_golden_response_scores_against_golden_answer():
    t = task("toolalpaca", "tool_call")
    rows = [json.loads(line) for line in (FIXTURES / "toolalpaca" / "test.jsonl").read_text().splitlines()]
    for ex, row in zip(t.test, rows, strict=True):
        assert json.loads(ex.answer) == row["golden_answer"]
        assert tool_call("\n".join(row["golden_response"]), ex.answer) == 1.0
    two_calls = t.test[1].answer
    assert (
        tool_call('Action: search\nAction Input: {"author": "Le Guin"}', two_calls) == 0.0
    )  # missing lookup
    assert (
        tool_call('Action: search\nAction: lookup\nAction Input: {"author": "Le Guin", "id": 7}', two_calls)
        == 1.0
    )
    assert (
        tool_call('Action: search\nAction Input: {"author": "Le Guin"\nAction: lookup', two_calls) == 0.0
    )  # bad JSON


def test_sciknoweval_contexts_keep_the_system_message():
    t = task("sciknoweval", "answer_tag")
    ex = t.train[0]
    user = (
        "Which gas is produced when zinc reacts with hydrochloric acid?\n\n"
        "A: Oxygen\nB: Hydrogen\nC: Chlorine\nD: Nitrogen"
    )
    assert t.student(ex) == [{"role": "system", "content": SCIENCE_SYSTEM}, {"role": "user", "content": user}]
    assert t.teacher(ex, TEACHER_TEMPLATES["paper"]) == [
        {"role": "system", "content": SCIENCE_SYSTEM},
        {"role": "user", "content": OFFICIAL_TEACHER.format(orig=user, output=ex.demonstration)},
    ]
    assert [e.answer for e in t.test] == ["A", "C"]
    assert answer_tag(t.test[0].demonstration, t.test[0].answer) == 1.0
    assert answer_tag("<reasoning>pH 7</reasoning><answer> A </answer> because", "A") == 1.0  # extra text
    assert answer_tag("The answer is A", "A") == 0.0  # no tag


def test_a_row_missing_a_format_field_names_the_row(tmp_path):
    (tmp_path / "t").mkdir()
    row = {"name": "X", "description": "d", "instruction": "q", "golden_response": ["Action: a"]}
    (tmp_path / "t" / "test.jsonl").write_text(json.dumps(row) + "\n")
    cfg = TaskConfig(source="json", path=str(tmp_path / "t"), format="toolalpaca", scorer="tool_call")
    with pytest.raises(
        DataError, match=r"task t: .*test.jsonl row 0: format toolalpaca: missing or empty 'nl_documentation'"
    ):
        load_task("t", cfg, train=False)


def test_a_formatted_task_runs_end_to_end(tmp_path, tiny_model_dir):
    """The fixture Tool Use task through `sdft run` on the tiny model (SDFT, one step)."""
    sdft(
        "run",
        *SMOKE,
        "task=[facts]",
        f"task.facts.path={FIXTURES / 'toolalpaca'}",
        "task.facts.source=json",
        "task.facts.format=toolalpaca",
        "task.facts.scorer=tool_call",
        "task.facts.teacher_template=paper",
        "task.facts.val_split=null",  # the fixture has train and test only
        "model.max_context=1024",
        f"runs_root={tmp_path}",
        cwd=tmp_path,
    )
    (run,) = (tmp_path / "smoke").iterdir()
    data = json.loads((run / "matrix.json").read_text())
    assert data["rows"] == ["base", "1:facts"] and data["columns"][0] == "facts"
