"""Scorers: ``score(prediction, answer) -> float in [0, 1]``, picked by name from ``SCORERS``.

``answer`` is the test row's reference as text. Where a scorer accepts alternatives, the reference
may be a JSON list of strings. ``answer_tag`` and ``tool_call`` follow the official SDFT evaluators.
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
    """Text after the last ``<answer>`` and before the next ``</answer>``, stripped, equals the reference.

    As the official Science evaluator: an unclosed final tag is read to the end of the text.
    """
    if "<answer>" not in prediction:
        return 0.0
    inside = prediction.rsplit("<answer>", 1)[1].split("</answer>", 1)[0].strip()
    return float(inside == answer.strip())


_ACTION = re.compile(r"Action:\s*(.+?)\s*(?:\n|$)")
_DECODER = json.JSONDecoder()


def parse_tool_calls(text: str) -> tuple[Counter, dict | None]:
    """Action names (as a multiset) and all Action Input JSON objects merged into one dict.

    Each ``Action Input:`` is decoded from its first ``{`` (a JSON object may span lines). Returns
    ``None`` for the inputs when any Action Input is not a valid JSON object.
    """
    names = Counter(m.strip() for m in _ACTION.findall(text))
    merged: dict = {}
    for part in text.split("Action Input:")[1:]:
        start = part.find("{")
        if start < 0:
            return names, None
        try:
            value, _ = _DECODER.raw_decode(part[start:])
        except json.JSONDecodeError:
            return names, None
        if not isinstance(value, dict):
            return names, None
        merged.update(value)
    return names, merged


def tool_call(prediction: str, answer: str) -> float:
    """Official tool-use check: the same multiset of actions and equal merged Action Input dicts.

    The reference is a JSON list of ``{"Action": name, "Action_Input": json-string-or-dict}``.
    """
    gold = json.loads(answer)
    gold_names = Counter(g["Action"].strip() for g in gold)
    gold_inputs: dict = {}
    for g in gold:
        value = g.get("Action_Input", {})
        gold_inputs.update(json.loads(value) if isinstance(value, str) else value)
    names, inputs = parse_tool_calls(prediction)
    return float(names == gold_names and inputs == gold_inputs)


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
    "regex": regex,
}


def get_scorer(name: str, key: str = "scorer") -> Callable[[str, str], float]:
    if name not in SCORERS:
        raise ConfigError(f"{key}={name!r} is not one of: {', '.join(SCORERS)}")
    return SCORERS[name]
