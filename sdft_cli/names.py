"""The package's vocabulary: every name a config value may take, and the teacher templates.

Pure data (and one validator); it imports nothing of ours but errors. Config schemas check names
against these tables, never against the modules that implement them, so the layers point one way:
errors -> names -> config -> data, models, judge, engines -> stages -> methods -> pipeline -> cli.
Each implementation table (``scorers.SCORERS``, ``formats.FORMATS``, ``methods.METHODS``, the task
loaders) is keyed by the names here; ``tests/test_layers.py`` checks that the two agree.
"""

from __future__ import annotations

import re

from sdft_cli.errors import ConfigError

# ----------------------------------------------------------------------------- teacher templates

# The teacher context (paper Sec. 3). `paper` is the official code's string (leading/trailing newline,
# period ending), `paper_printed` the text as printed in the paper, `nothink` drops "including the thinking
# process", which makes small models ramble after the answer (shared measurements on SmolLM2-135M).
TEACHER_TEMPLATES = {
    "paper": (
        "\n{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    ),
    "paper_printed": (
        "{prompt}\n\nThis is an example for a response to the question:\n\n{demonstration}\n\n"
        "Now answer with a response of your own, including the thinking process:"
    ),
    "nothink": (
        "{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own."
    ),
    # The demonstration as the model's own earlier answer to the same question (turns split at {turn}):
    # a small teacher follows a demonstration it "said" without echoing the template's words, which a
    # 135M model does with the one-turn templates above (docs/tasks.md).
    "example_turn": "Example question:\n{prompt}{turn}{demonstration}{turn}{prompt}",
    # The same, asking for the earlier answer again instead of repeating the prompt (shorter).
    "again_turn": "{prompt}{turn}{demonstration}{turn}Give the same answer again.",
    # The prompt alone: a teacher that differs from the student only in its weights (re-invocation).
    "prompt_only": "{prompt}",
    # The toy world's (docs/toy_world.md): short, because its model reads one character per token.
    "toy": "{prompt}\nexample: {demonstration}\nanswer:",
    # Knowledge acquisition (paper App. A.2): the article text plus the answer, the paper's default
    # teacher context. The paper does not show how the article is laid out; this puts it before the
    # official template's example.
    "knowledge": (
        "\n{prompt}\n\nHere is an article with the information needed to answer the question:\n{context}\n\n"
        "This is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    ),
    # Fig. 7's "Only Text" ablation ("Only Answers" is `paper`).
    "knowledge_text": (
        "\n{prompt}\n\nHere is an article with the information needed to answer the question:\n{context}\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    ),
}
PLACEHOLDER = re.compile(r"\{(prompt|demonstration|context)\}")
# Splits a teacher template into alternating user / assistant turns; the last turn is the user's.
TURN = "{turn}"


def teacher_template(name_or_text: str, key: str = "method.teacher_template") -> str:
    """A named template or a literal one: {prompt} and at least one of {demonstration} and {context}.

    ``key`` is the config key the value came from, for the error message."""
    if name_or_text in TEACHER_TEMPLATES:
        return TEACHER_TEMPLATES[name_or_text]
    if "{prompt}" not in name_or_text or not (
        "{demonstration}" in name_or_text or "{context}" in name_or_text
    ):
        raise ConfigError(
            f"{key} is neither a known name ({', '.join(TEACHER_TEMPLATES)}) nor a template containing "
            f"{{prompt}} and {{demonstration}} (or {{context}}); got {name_or_text[:60]!r}"
        )
    if name_or_text.count(TURN) % 2:
        raise ConfigError(
            f"{key}: a template's {TURN} markers alternate user and assistant turns and must end on the "
            f"user's, so their number must be even; got {name_or_text.count(TURN)}"
        )
    return name_or_text


def resolve_teacher_template(method_template: str | None, task_template: str | None) -> str:
    """The method's template when set (a command-line ablation applies to every task), else the task's,
    else the official code's."""
    return teacher_template(method_template or task_template or "paper")


# ----------------------------------------------------------------------------- tasks

# Where a task's rows come from (tasks.load_rows dispatches on it).
TASK_SOURCES = ("bundled", "json", "csv", "parquet", "hf", "disk", "toy", "knowledge")
# How a row is read: `columns` by the names in task.<name>.columns, the others are the paper's released
# row formats (formats.FORMATS).
ROW_FORMATS = ("columns", "toolalpaca", "sciknoweval", "huatuo")
# Scorers of one prediction against its reference (scorers.SCORERS).
SCORERS = ("exact_match", "contains", "answer_tag", "tool_call", "tool_call_strict", "regex")
# LLM-judged scorers (judge.py): the judge prompt and the mapping from its verdicts to credit.
JUDGE_SCORERS = {
    "judge_medical": ("medical", "strict"),
    "judge_knowledge_strict": ("knowledge", "strict"),
    "judge_knowledge_lenient": ("knowledge", "lenient"),
}

# ----------------------------------------------------------------------------- methods and objective

# Training methods (methods.METHODS: schema, train function; conf/method/<name>.yaml: values).
METHODS = ("sdft", "offline_distill", "sft", "sft_teacher", "dft", "sft_reinvoke")
# The per-token objective (divergence.py; docs/objective.md).
DIVERGENCES = ("forward", "reverse", "jsd")
SUPPORTS = ("full", "topk")
ESTIMATORS = ("analytic", "sampled", "rb")
