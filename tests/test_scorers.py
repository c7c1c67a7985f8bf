"""Scorers, including the official tool-use and <answer>-tag semantics."""

import json

import pytest

from sdft_cli.errors import ConfigError
from sdft_cli.scorers import answer_tag, contains, exact_match, get_scorer, parse_tool_calls, tool_call


def test_exact_match_normalises_case_punctuation_space():
    assert exact_match("  Paris. ", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("cold", json.dumps(["cold", "cool"])) == 1.0


def test_contains_whole_words_and_alternatives():
    assert contains("The capital of France is Paris.", json.dumps(["Paris"])) == 1.0
    assert contains("Parisian cafes", "Paris") == 0.0
    assert contains("It is cool today", json.dumps(["cold", "cool"])) == 1.0
    assert contains("The main export is clay.", "clay") == 1.0
    assert contains("Buenos Aires is the capital", json.dumps(["Buenos Aires"])) == 1.0
    assert contains("anything", json.dumps([""])) == 0.0


def test_answer_tag_last_tag_wins_and_unclosed_is_read_to_end():
    assert answer_tag("<answer>B</answer> because", "B") == 1.0
    assert answer_tag("<answer>A</answer> no wait <answer>\nC\n</answer>", "C") == 1.0
    assert answer_tag("<answer>A</answer> no wait <answer>C</answer>", "A") == 0.0
    assert answer_tag("<answer> D", "D") == 1.0
    assert answer_tag("The answer is D", "D") == 0.0


GOLD = json.dumps([{"Action": "get_weather", "Action_Input": json.dumps({"city": "Oslo", "unit": "c"})}])


def test_tool_call_official_semantics():
    assert tool_call('Action: get_weather\nAction Input: {"unit": "c", "city": "Oslo"}', GOLD) == 1.0
    # multi-line JSON is accepted
    assert (
        tool_call('Thought: x\nAction: get_weather\nAction Input: {\n "city": "Oslo",\n "unit": "c"\n}', GOLD)
        == 1.0
    )
    # wrong args, wrong tool, a repeated action, or invalid JSON all fail
    assert tool_call('Action: get_weather\nAction Input: {"city": "Lima", "unit": "c"}', GOLD) == 0.0
    assert tool_call('Action: set_alarm\nAction Input: {"city": "Oslo", "unit": "c"}', GOLD) == 0.0
    twice = 'Action: get_weather\nAction Input: {"city": "Oslo", "unit": "c"}\n' * 2
    assert tool_call(twice, GOLD) == 0.0
    assert tool_call("Action: get_weather\nAction Input: {city: Oslo}", GOLD) == 0.0
    assert tool_call("no call at all", GOLD) == 0.0


def test_parse_tool_calls_merges_inputs():
    names, merged = parse_tool_calls('Action: a\nAction Input: {"x": 1}\nAction: b\nAction Input: {"y": 2}')
    assert names == {"a": 1, "b": 1} and merged == {"x": 1, "y": 2}


def test_unknown_scorer_names_the_key():
    with pytest.raises(ConfigError, match="task.x.scorer='nope'"):
        get_scorer("nope", "task.x.scorer")


def test_regex_searches_each_alternative():
    from sdft_cli.scorers import regex

    assert regex("The call was get_weather(city='Paris')", r"get_weather\(city='Paris'\)") == 1.0
    assert regex("get_weather(city='Rome')", r"get_weather\(city='Paris'\)") == 0.0
    assert regex("answer: 42.", '["^answer: 41", "answer: 4[0-9]"]') == 1.0
    assert regex("", r"^$") == 1.0


def test_an_invalid_regex_reference_names_its_row(tmp_path):
    import json

    from sdft_cli.config import TaskConfig
    from sdft_cli.errors import DataError
    from sdft_cli.tasks import load_task

    (tmp_path / "t").mkdir()
    rows = [{"prompt": "p", "answer": "ok+"}, {"prompt": "p", "answer": "bad(["}]
    (tmp_path / "t" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=r"task t: .*test.jsonl row 1: invalid regex 'bad\(\['"):
        load_task("t", TaskConfig(source="json", path=str(tmp_path / "t"), scorer="regex"), train=False)
