"""Scorers, including the official tool-use and <answer>-tag semantics."""

import json

import pytest

from sdft_cli.errors import ConfigError
from sdft_cli.scorers import (
    answer_tag,
    contains,
    exact_match,
    get_scorer,
    parse_tool_calls,
    tool_call,
    tool_call_strict,
)


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


# The official Science rule: the text after the last <answer> (the whole response without one), cut at
# the next </answer>, stripped, equals the reference. (response, reference B scored)
SCIENCE = [
    ("<answer>B</answer>", 1.0),
    ("<answer> B </answer> because B is an alkene.", 1.0),
    ("B", 1.0),  # no tag: the whole response
    ("  B\n", 1.0),
    ("The answer is B", 0.0),  # no tag: the whole response is not the letter
    ("<answer>A</answer> no wait <answer>B</answer>", 1.0),  # the last tag counts
    ("<answer>B</answer> no wait <answer>A</answer>", 0.0),
    ("Reasoning first. <answer>B", 1.0),  # unclosed: read to the end
    ("<answer>b</answer>", 0.0),  # case matters
    ("<answer>(B)</answer>", 0.0),
    ("<answer>B.</answer>", 0.0),
    ("", 0.0),
    ("<answer></answer>", 0.0),
    ("Reasoning...\n<answer>\nB\n</answer>\nDone.", 1.0),
    ("</answer>B", 0.0),  # no opening tag: the whole response, cut at </answer>, is empty
    ("<ANSWER>B</ANSWER>", 0.0),  # tags are lower case
    ("<answer>B</answer>C", 1.0),
]


@pytest.mark.parametrize(("response", "expected"), SCIENCE, ids=[repr(r)[:40] for r, _ in SCIENCE])
def test_answer_tag_follows_the_official_science_rule(response, expected):
    assert answer_tag(response, "B") == expected


def test_answer_tag_compares_with_the_reference_as_stored():
    """The official code strips the response's answer, not the reference: a reference with whitespace
    matches nothing."""
    assert answer_tag("<answer>B</answer>", "B ") == 0.0
    assert answer_tag("<answer>B </answer>", "B ") == 0.0


def _gold(*calls) -> str:
    return json.dumps([{"Action": a, "Action_Input": i} for a, i in calls])


OSLO = _gold(("getWeather", json.dumps({"city": "Oslo", "unit": "c"})))
CALL = 'Action: getWeather\nAction Input: {"city": "Oslo", "unit": "c"}'
NESTED = _gold(("getWeather", json.dumps({"city": "Oslo", "opts": {"unit": "c"}})))
TWO = _gold(("a", json.dumps({"x": 1})), ("b", json.dumps({"y": 2})))
# (response, reference, official tool_call, tool_call_strict): the official values follow the rule in
# docs/tasks.md (names = word characters after "Action:", inputs = the shortest {...} after "Action
# Input:", each parsed and merged, unparsable ones skipped, the same for the reference's inputs).
TOOLUSE = [
    (CALL, OSLO, 1.0, 1.0),
    ('Action: getWeather\nAction Input: {"unit": "c", "city": "Oslo"}', OSLO, 1.0, 1.0),  # key order
    ('Thought: x\nAction: getWeather\nAction Input: {\n "city": "Oslo",\n "unit": "c"\n}', OSLO, 1.0, 1.0),
    ('Action:getWeather\nAction Input:{"city":"Oslo","unit":"c"}', OSLO, 1.0, 1.0),  # no spaces
    (CALL.replace("getWeather", "getWeather."), OSLO, 1.0, 0.0),  # a trailing period
    (CALL.replace("getWeather", "getWeather  # the weather tool"), OSLO, 1.0, 0.0),  # a comment
    ('Action: getWeather\nAction Input: ```json\n{"city": "Oslo", "unit": "c"}\n```', OSLO, 0.0, 1.0),
    (CALL + "\nAction Input: none", OSLO, 1.0, 0.0),  # a stray input after a valid one
    ('Action: get-weather\nAction Input: {"q": 1}', _gold(("get-weather", '{"q": 1}')), 0.0, 1.0),
    ('Action: getWeather\nAction Input: {"city": "Oslo", "opts": {"unit": "c"}}', NESTED, 0.0, 1.0),
    ('Action: getWeather\nAction Input: {"city": "Lima", "unit": "c"}', OSLO, 0.0, 0.0),  # wrong args
    ('Action: setAlarm\nAction Input: {"city": "Oslo", "unit": "c"}', OSLO, 0.0, 0.0),  # wrong tool
    (CALL + "\n" + CALL, OSLO, 0.0, 0.0),  # the action twice
    ("Action: getWeather\nAction Input: {city: Oslo, unit: c}", OSLO, 0.0, 0.0),  # not JSON
    ("no call at all", OSLO, 0.0, 0.0),
    (CALL.replace("Action:", "action:"), OSLO, 0.0, 0.0),  # case matters
    ('Action: getWeather\nAction Input: {"city": "Oslo", "unit": "c", "x": 1}', OSLO, 0.0, 0.0),
    ('Action: getWeather\nAction Input: {"city": "Oslo"}\nAction Input: {"unit": "c"}', OSLO, 1.0, 1.0),
    ('Action: b\nAction Input: {"y": 2}\nAction: a\nAction Input: {"x": 1}', TWO, 1.0, 1.0),
    ("Action: getWeather\nAction Input: {}", _gold(("getWeather", "city=Oslo")), 1.0, 1.0),  # gold not JSON
    ("Action: getWeather", _gold(("getWeather", "city=Oslo")), 1.0, 1.0),
    # an input stored as an object, not JSON text: json.loads fails on it and the official code skips it
    ('Action: getWeather\nAction Input: {"city": "Oslo"}', _gold(("getWeather", {"city": "Oslo"})), 0.0, 0.0),
    ("Action: getWeather\nAction Input: {}", _gold(("getWeather", {"city": "Oslo"})), 1.0, 1.0),
    # a reference name is compared as stored: a trailing space never matches a word-character run
    (CALL, _gold(("getWeather ", json.dumps({"city": "Oslo", "unit": "c"}))), 0.0, 0.0),
]


@pytest.mark.parametrize(
    ("response", "reference", "official", "strict"), TOOLUSE, ids=[repr(r)[:50] for r, *_ in TOOLUSE]
)
def test_tool_call_follows_the_official_rule_and_the_strict_parser_its_own(
    response, reference, official, strict
):
    assert tool_call(response, reference) == official
    assert tool_call_strict(response, reference) == strict


def test_parse_tool_calls_merges_inputs():
    names, merged = parse_tool_calls('Action: a\nAction Input: {"x": 1}\nAction: b\nAction Input: {"y": 2}')
    assert names == {"a": 1, "b": 1} and merged == {"x": 1, "y": 2}


@pytest.mark.parametrize("scorer", ["tool_call", "tool_call_strict"])
def test_a_malformed_tool_reference_is_reported_with_its_row_when_the_task_loads(tmp_path, scorer):
    from sdft_cli.config import TaskConfig
    from sdft_cli.errors import DataError
    from sdft_cli.tasks import load_task

    (tmp_path / "t").mkdir()
    rows = [{"prompt": "p", "answer": OSLO}, {"prompt": "p", "answer": "getWeather(city=Oslo)"}]
    (tmp_path / "t" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = TaskConfig(source="json", path=str(tmp_path / "t"), scorer=scorer)
    with pytest.raises(DataError, match=r"test.jsonl row 1: the tool-call reference is not JSON"):
        load_task("t", cfg, train=False)


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
