"""Row formats of the paper's released datasets, read into (prompt, demonstration, answer, system).

``task.<name>.format`` picks one; ``columns`` (the default) reads the columns named in
``task.<name>.columns``. The contexts then come from the same templates as every task, which match
the official code (paper.md Sec. 2.2): the Tool Use teacher context is one user message with the tool
prompt and the golden response lines joined by newlines; the Science contexts keep the row's system
message and put the template in the user turn.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from sdft_cli.errors import DataError

# The ToolAlpaca user prompt of the official release (its first line ends with a space).
TOOL_PROMPT = (
    "Your task is to answer the user's question using available tools. \n"
    "You have access to the following tools:\n"
    "Name: {name}\n"
    "Description: {description}\n"
    "Documentation:\n"
    "{nl_documentation}\n"
    "\n"
    "Use the following format:\n"
    "Thought: you should always think about what to do\n"
    "Action: the action to take, should be one of the tool names.\n"
    "Action Input: the input to the action, must be in JSON format. All of the action input must be "
    "realistic and from the user.\n"
    "\n"
    "Begin!\n"
    "Question: {instruction}"
)


def _need(row: dict, key: str, fmt: str) -> object:
    if key not in row or row[key] in (None, "", []):
        raise DataError(f"format {fmt}: missing or empty {key!r} (columns: {sorted(row)})")
    return row[key]


def toolalpaca(row: dict) -> dict:
    """ToolAlpaca (official release): ``prompt`` or name/description/nl_documentation/instruction;
    ``golden_response`` (lines) is the demonstration, ``golden_answer`` the tool_call reference."""
    prompt = row.get("prompt") or TOOL_PROMPT.format(
        **{k: _need(row, k, "toolalpaca") for k in ("name", "description", "nl_documentation", "instruction")}
    )
    response = row.get("golden_response")
    if isinstance(response, list):
        if not all(isinstance(line, str) for line in response):
            raise DataError("format toolalpaca: 'golden_response' must be a list of text lines")
        response = "\n".join(response)
    demonstration = response
    gold = row.get("golden_answer")
    answer = gold if gold is None or isinstance(gold, str) else json.dumps(gold, ensure_ascii=False)
    return {"prompt": prompt, "demonstration": demonstration, "answer": answer, "system": None}


def _split_messages(messages: list[dict], fmt: str) -> tuple[str | None, str]:
    if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"format {fmt}: every message must be an object with a text 'content'")
    system = next((m["content"] for m in messages if m.get("role") == "system"), None)
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if len(users) != 1:
        raise DataError(f"format {fmt}: expected one user message, got {len(users)}")
    return system, users[0]


def sciknoweval(row: dict) -> dict:
    """SciKnowEval as released for SDFT: training rows have ``messages`` (system + user) and the
    demonstration (``output_text`` in the official release, or ``demonstration``); evaluation rows a
    ``prompt`` (messages or text) and the ``answer`` letter."""
    messages = row.get("messages") or row.get("prompt")
    if isinstance(messages, list):
        system, prompt = _split_messages(messages, "sciknoweval")
    else:
        system, prompt = None, _need(row, "prompt", "sciknoweval")
    return {
        "prompt": prompt,
        "demonstration": row.get("output_text") or row.get("demonstration"),
        "answer": row.get("answer"),
        "system": system,
    }


def huatuo(row: dict) -> dict:
    """HuatuoGPT-o1 (Medical): SFT rows (``Question``, ``Complex_CoT``, ``Response``) train with the final
    ``Response`` as the demonstration, not the chain of thought (paper Sec. 4.5: the data "contains no
    explicit chain-of-thought annotations"); verifiable problems (``Open-ended Verifiable Question``,
    ``Ground-True Answer``) evaluate."""
    prompt = row.get("Question") or row.get("Open-ended Verifiable Question")
    if not prompt:
        raise DataError(
            f"format huatuo: no 'Question' or 'Open-ended Verifiable Question' (columns: {sorted(row)})"
        )
    return {
        "prompt": prompt,
        "demonstration": row.get("Response"),
        "answer": row.get("Ground-True Answer"),
        "system": None,
    }


FORMATS: dict[str, Callable[[dict], dict]] = {
    "toolalpaca": toolalpaca,
    "sciknoweval": sciknoweval,
    "huatuo": huatuo,
}
