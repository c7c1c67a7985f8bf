"""Scorers: ``score(prediction, answer) -> float in [0, 1]``, picked by name from ``SCORERS``.

``answer`` is the test row's reference as text. Where a scorer accepts alternatives, the reference
may be a JSON list of strings. ``answer_tag`` and ``tool_call`` follow the official SDFT evaluators'
rules (docs/tasks.md, "Scorers"); ``tool_call_strict`` is a stricter parser, never the paper default.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable

from sdft_cli.errors import ConfigError

_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation, collapse whitespace (SQuAD-style normalisation)."""
    return " ".join(text.lower().translate(_PUNCT).split())


def alternatives(answer: str) -> list[str]:
    """A reference that is a JSON list means "any of these"; otherwise it is one string."""
    answer = answer.strip()
    if answer.startswith("["):
        try:
            values = json.loads(answer)
        except json.JSONDecodeError:
            return [answer]
        if isinstance(values, list) and all(isinstance(v, str) for v in values):
            return values
    return [answer]


def exact_match(prediction: str, answer: str) -> float:
    """Normalised prediction equals one of the normalised references."""
    pred = normalize(prediction)
    return float(any(pred == normalize(a) for a in alternatives(answer)))


def contains(prediction: str, answer: str) -> float:
    """One of the references occurs in the prediction as whole words (case- and punctuation-insensitive)."""
    pred = f" {normalize(prediction)} "
    return float(any(f" {normalize(a)} " in pred for a in alternatives(answer) if normalize(a)))


def answer_tag(prediction: str, answer: str) -> float:
    """The official Science rule: the text after the last ``<answer>`` (the whole response when it has no
    tag), up to the next ``</answer>`` (to the end when the tag is unclosed), stripped, equals the
    reference as stored."""
    inside = prediction.rsplit("<answer>", 1)[-1].split("</answer>", 1)[0].strip()
    return float(inside == answer)  # the reference as stored: the official code does not strip it


# The official Tool Use rule: a name is the run of word characters after `Action:`; an input is the
# shortest `{...}` after `Action Input:` (it may span lines), so a nested object is cut at its first `}`.
_ACTION = re.compile(r"Action:\s*(\w+)")
_ACTION_INPUT = re.compile(r"Action Input:\s*(\{.*?\})", re.DOTALL)


def _merge_json(blocks: list[str]) -> dict:
    """The predicted inputs merged in order; a block that is not valid JSON is skipped."""
    merged: dict = {}
    for block in blocks:
        try:
            merged.update(json.loads(block))
        except json.JSONDecodeError:
            continue
    return merged


def parse_tool_calls(text: str) -> tuple[Counter, dict]:
    """Action names (a multiset) and every Action Input object merged, by the official rule."""
    return Counter(_ACTION.findall(text)), _merge_json(_ACTION_INPUT.findall(text))


def gold_tool_calls(answer: str) -> tuple[Counter, dict]:
    """The reference's names (as stored) and merged inputs: a JSON list of ``{"Action", "Action_Input"}``
    whose inputs are JSON text. As in the official evaluator, an input that fails to merge (not JSON
    text, not an object, missing) is skipped. Tasks check that every reference is such a list when they
    load (``tasks.load_task``)."""
    gold = json.loads(answer)
    merged: dict = {}
    for g in gold:
        try:
            merged.update(json.loads(g["Action_Input"]))
        except Exception:  # noqa: BLE001  (the official code skips whatever fails here)
            continue
    return Counter(g["Action"] for g in gold), merged


def check_tool_reference(answer: str) -> str | None:
    """Why ``answer`` is not a tool-call reference (a JSON list of objects with an ``Action``), or None."""
    try:
        gold = json.loads(answer)
    except json.JSONDecodeError as e:
        return f"not JSON ({e.msg})"
    if not isinstance(gold, list) or not all(isinstance(g, dict) and "Action" in g for g in gold):
        return 'not a list of {"Action": ..., "Action_Input": ...} objects'
    return None


def tool_call(prediction: str, answer: str) -> float:
    """Official tool-use check: the same multiset of action names and equal merged Action Input dicts."""
    return float(parse_tool_calls(prediction) == gold_tool_calls(answer))


_DECODER = json.JSONDecoder()


def tool_call_strict(prediction: str, answer: str) -> float:
    """A stricter reading than the official one (not the paper's numbers): the whole rest of the
    ``Action:`` line is the name, each Action Input is decoded from its first ``{`` as one JSON value
    (nested objects whole), and any Action Input that is not a JSON object fails the response."""
    names = Counter(m.strip() for m in re.findall(r"Action:\s*(.+?)\s*(?:\n|$)", prediction))
    merged: dict = {}
    for part in prediction.split("Action Input:")[1:]:
        start = part.find("{")
        try:
            value = _DECODER.raw_decode(part[start:])[0] if start >= 0 else None
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            return 0.0
        merged.update(value)
    return float((names, merged) == gold_tool_calls(answer))


def regex(prediction: str, answer: str) -> float:
    """The reference is a Python regular expression (or a JSON list of them), searched in the prediction.

    Patterns are compiled when the task loads (``tasks.load_task``), so an invalid one is reported with
    its row before any work.
    """
    return float(any(re.search(pattern, prediction) for pattern in alternatives(answer)))


SCORERS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "contains": contains,
    "answer_tag": answer_tag,
    "tool_call": tool_call,
    "tool_call_strict": tool_call_strict,
    "regex": regex,
}


def get_scorer(name: str, key: str = "scorer") -> Callable[[str, str], float]:
    if name not in SCORERS:
        raise ConfigError(f"{key}={name!r} is not one of: {', '.join(SCORERS)}")
    return SCORERS[name]
