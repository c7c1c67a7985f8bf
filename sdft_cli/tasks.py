"""Tasks: loading rows through `datasets`, validating them, and rendering student and teacher contexts.

A task row has a prompt, a demonstration (training rows) and a reference answer (test rows, read by the
task's scorer). The student sees the prompt only; the teacher sees the prompt plus the demonstration
inside a teacher template (paper Sec. 3). Both are rendered with the model's chat template.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from sdft_cli.config import ColumnsConfig, Config, SFTReinvokeConfig, TaskConfig
from sdft_cli.errors import ConfigError, DataError

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
_PLACEHOLDER = re.compile(r"\{(prompt|demonstration|context)\}")


@dataclass(frozen=True)
class Example:
    index: int
    prompt: str
    demonstration: str | None
    answer: str | None
    # A row's own system message (row formats that carry one); None = the task's system_prompt.
    system: str | None = None
    # Source text for the teacher's {context} (a knowledge-acquisition question's article).
    context: str | None = None


@dataclass
class Task:
    name: str
    cfg: TaskConfig
    train: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)

    def system(self, ex: Example) -> str | None:
        """The system message of both of ``ex``'s contexts."""
        return ex.system if ex.system is not None else self.cfg.system_prompt

    def student(self, ex: Example) -> list[dict]:
        return student_messages(ex.prompt, self.system(ex))

    def teacher(self, ex: Example, template: str) -> list[dict]:
        return teacher_messages(ex.prompt, ex.demonstration or "", template, self.system(ex), ex.context)


# ----------------------------------------------------------------------------- templates


def resolve_teacher_template(method_template: str | None, task_template: str | None) -> str:
    """The method's template when set (a command-line ablation applies to every task), else the task's,
    else the official code's."""
    return teacher_template(method_template or task_template or "paper")


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
    return name_or_text


def fill_template(template: str, prompt: str, demonstration: str, context: str = "") -> str:
    """Substitute in one pass, so braces inside prompts (JSON, code) are left alone."""
    values = {"prompt": prompt, "demonstration": demonstration, "context": context}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def student_messages(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def teacher_messages(
    prompt: str, demonstration: str, template: str, system: str | None, context: str | None = None
) -> list[dict]:
    return student_messages(fill_template(template, prompt, demonstration, context or ""), system)


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat context ending with the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # base models without a chat template: plain text, one block per message
        text = "\n\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- loading


def bundled_dir() -> Path:
    return Path(str(importlib.resources.files("sdft_cli.data"))) / "tasks"


def bundled_tasks() -> list[str]:
    return sorted(p.name for p in bundled_dir().iterdir() if p.is_dir())


def _split_file(cfg: TaskConfig, split: str, task: str) -> Path:
    if cfg.source == "bundled":
        path = bundled_dir() / cfg.path / f"{split}.jsonl"
        if not path.parent.is_dir():
            raise ConfigError(
                f"task {task}: no bundled data set {cfg.path!r} (available: {', '.join(bundled_tasks())})"
            )
    elif "{split}" in cfg.path:
        path = Path(cfg.path.replace("{split}", split)).expanduser()
    else:
        path = Path(cfg.path).expanduser() / f"{split}.{'jsonl' if cfg.source == 'json' else cfg.source}"
    if not path.is_file():
        raise DataError(f"task {task}: {split} split file not found: {path}")
    return path


def _load_rows(cfg: TaskConfig, kind: str, task: str, generate: bool = True) -> tuple[list[dict], str]:
    """Rows of the ``train`` or ``test`` split as dicts, through `datasets` (the real loading path for
    local and hub data).

    ``generate=False``: a knowledge task whose QA pairs are not generated yet fails instead of calling
    the generator (``sdft plan``).
    """
    import datasets

    datasets.disable_progress_bars()
    split = cfg.train_split if kind == "train" else cfg.test_split
    if kind == "test" and cfg.test_path:  # the test split from another dataset
        import dataclasses

        cfg = dataclasses.replace(cfg, path=cfg.test_path, subset=cfg.test_subset, test_path=None)
    if cfg.source == "toy":
        return _toy_rows(cfg, split, task), f"toy world {cfg.path}[{split}]"
    if cfg.source == "knowledge":
        from sdft_cli import knowledge

        return knowledge.rows(cfg, kind, task, generate), f"knowledge {cfg.path}[{kind}]"
    if cfg.source == "disk":
        return _disk_rows(cfg, split, task), f"{cfg.path}[{split}]"
    if cfg.source == "hf":
        try:
            ds = datasets.load_dataset(cfg.path, cfg.subset, split=split)
        except Exception as e:  # network, missing split, bad name: one line naming the task
            raise DataError(f"task {task}: cannot load {cfg.path!r} split {split!r}: {e}") from None
        return ds.to_list(), f"{cfg.path}[{split}]"
    path = _split_file(cfg, split, task)
    builder = {"bundled": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[cfg.source]
    parsed = check_text_file(path, task, builder) if builder in ("json", "csv") else None
    try:
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        rows = ds.to_list()  # Arrow decodes strings here: a late error must name the file too
    except Exception as e:
        if parsed is None:
            raise DataError(f"task {task}: cannot read {path}: {_reason(e)}") from None
        # Arrow makes one table and refuses a column whose type changes between rows; the rows as read
        # go through the same checks, which name the row and column at fault (or accept them).
        rows = parsed
        for i, row in enumerate(rows):
            try:
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"task {task}: {path} row {i} holds text that is not valid Unicode") from None
    return rows, str(path)


def _reason(e: BaseException) -> str:
    """The first line of the innermost cause: `datasets` wraps the reader's own error (Arrow's, which
    names the row) in a generic "An error occurred while generating the dataset"."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def check_text_file(path: Path, task: str, kind: str) -> list[dict] | None:
    """Refuse a local JSON/JSONL or CSV file that is empty, not UTF-8, or (JSON) holds a line that is not
    a JSON object, naming the file and its line, before `datasets` reads it: its errors name neither,
    and some (undecodable bytes) surface only as a traceback when the rows are read.

    Returns a JSON file's rows as read (None for CSV, or a JSON document of columns)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(
            f"task {task}: {path} line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); "
            "save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"task {task}: {path} is empty (no rows)")
    if kind != "json":
        return None
    if text.lstrip().startswith(("[", "{")):  # one JSON document (a list of rows, columns) rather than lines
        try:
            doc = json.loads(text)
        except json.JSONDecodeError:
            doc = None  # not one document: JSON Lines, checked below
        if isinstance(doc, list):
            bad = next((i for i, r in enumerate(doc) if not isinstance(r, dict)), None)
            if bad is not None:
                raise DataError(
                    f"task {task}: {path} item {bad} is a JSON {_json_type(doc[bad])}, not an object"
                )
            if not doc:
                raise DataError(f"task {task}: {path} is an empty JSON list (no rows)")
            return doc
        if isinstance(doc, dict):  # a document of columns, or a file of one row
            return None if doc and all(isinstance(v, list) for v in doc.values()) else [doc]
    rows = []
    # "\n" only: str.splitlines would also split at U+2028 and other separators JSON strings may hold
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise DataError(f"task {task}: {path} line {n} has the key {e.args[0]!r} twice") from None
        except json.JSONDecodeError as e:
            raise DataError(
                f"task {task}: {path} line {n} is not valid JSON: {e.msg} (column {e.colno})"
            ) from None
        if not isinstance(row, dict):
            raise DataError(
                f"task {task}: {path} line {n} is a JSON {_json_type(row)}, not an object of columns"
            )
        rows.append(row)
    return rows


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique (Arrow refuses a repeated one without saying where)."""
    row = {}
    for key, value in pairs:
        if key in row:
            raise _DuplicateKey(key)
        row[key] = value
    return row


def _json_type(value: object) -> str:
    names = {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        list: "array",
        type(None): "null",
    }
    return names.get(type(value), "object" if isinstance(value, dict) else type(value).__name__)


def _disk_rows(cfg: TaskConfig, split: str, task: str) -> list[dict]:
    """A ``save_to_disk`` copy: ``path/<split>`` (the official SDFT release's ``train_data``/``eval_data``)
    or a saved DatasetDict at ``path``."""
    import datasets

    root = Path(cfg.path).expanduser()
    try:
        if (root / split).is_dir():
            return datasets.load_from_disk(str(root / split)).to_list()
        saved = datasets.load_from_disk(str(root))
    except Exception as e:
        raise DataError(f"task {task}: cannot read the saved dataset {root}: {e}") from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError(f"task {task}: {root} has no split {split!r} (splits: {', '.join(saved)})")
        return saved[split].to_list()
    raise DataError(f"task {task}: {root} is one saved dataset; name its parent and the split directory")


def _toy_rows(cfg: TaskConfig, split: str, task: str) -> list[dict]:
    """A toy-world skill's rows, generated (deterministically) rather than read."""
    from sdft_cli.toy import world

    if cfg.path not in world.SKILLS:
        raise ConfigError(
            f"task {task}: no toy-world skill {cfg.path!r} (available: {', '.join(world.SKILLS)})"
        )
    if split not in world.DEFAULT_ROWS:
        raise ConfigError(f"task {task}: toy-world splits are {', '.join(world.DEFAULT_ROWS)}, not {split!r}")
    style = cfg.subset or "plain"
    if style not in world.STYLES:
        raise ConfigError(f"task {task}: subset (the demonstration style) must be one of {world.STYLES}")
    limit = cfg.max_train if split == cfg.train_split else cfg.max_test
    return world.rows(cfg.path, split, limit or world.DEFAULT_ROWS[split], style=style)


def _text(
    row: dict, column: str, task: str, where: str, i: int, required: bool, structured: bool = False
) -> str | None:
    """One cell as text. Numbers are written as text (CSV columns arrive typed); an empty, whitespace-only
    or NaN cell counts as missing. Lists and objects are JSON text where ``structured`` (reference answers
    such as a tool call), and refused elsewhere: a prompt or demonstration must be text."""
    if column not in row:
        if required:
            raise DataError(f"task {task}: {where} row {i} has no column {column!r} (columns: {sorted(row)})")
        return None
    value = row[column]
    if (
        value is None
        or (isinstance(value, str) and not value.strip())
        or (isinstance(value, float) and math.isnan(value))
        or (isinstance(value, (list, dict)) and not value)
    ):
        if required:
            raise DataError(f"task {task}: {where} row {i} has an empty {column!r}")
        return None
    if isinstance(value, (dict, list)) and structured:
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(
            f"task {task}: {where} row {i}: {column!r} must be text, not a JSON {_json_type(value)} "
            f"({str(value)[:60]!r})"
        )
    return str(value)


def _examples(
    rows: list[dict], positions: list[int], cfg: TaskConfig, task: str, where: str, train: bool
) -> list[Example]:
    """Validated examples: a training row needs a demonstration, a test row a reference answer.

    ``positions``: each row's index in its split as read (before the ``sample_seed`` shuffle), the row
    number every message names and the example's ``index``."""
    cols = cfg.columns
    if cfg.format != "columns":
        from sdft_cli.formats import FORMATS

        cols, adapted = ColumnsConfig(), []
        for i, r in zip(positions, rows, strict=True):
            try:
                adapted.append(FORMATS[cfg.format](r))
            except DataError as e:
                raise DataError(f"task {task}: {where} row {i}: {e}") from None
            except (AttributeError, KeyError, TypeError, ValueError) as e:  # a row of another shape
                raise DataError(
                    f"task {task}: {where} row {i}: not a {cfg.format} row ({type(e).__name__}: {e})"
                ) from None
        rows = adapted
    return [
        Example(
            index=i,
            prompt=_text(r, cols.prompt, task, where, i, True),  # type: ignore[arg-type]
            demonstration=_text(r, cols.demonstration, task, where, i, train),
            answer=_text(r, cols.answer, task, where, i, not train, structured=True),
            system=_text(r, "system", task, where, i, False) if cfg.format != "columns" else None,
            context=_text(r, cols.context, task, where, i, False),
        )
        for i, r in zip(positions, rows, strict=True)
    ]


def _sampled_rows(
    cfg: TaskConfig, kind: str, name: str, limit: int | None, generate: bool = True
) -> tuple[list[dict], list[int], str]:
    """The rows of one split, shuffled by ``sample_seed`` (when set), then capped at ``limit``; with
    each row's position in the split as read."""
    rows, where = _load_rows(cfg, kind, name, generate)
    positions = list(range(len(rows)))
    if cfg.sample_seed is not None:
        import random

        order = list(range(len(rows)))  # the same permutation as shuffling the rows themselves
        random.Random(f"{cfg.sample_seed}:{kind}").shuffle(order)
        rows, positions = [rows[i] for i in order], order
    rows, positions = (rows[:limit], positions[:limit]) if limit else (rows, positions)
    if not rows:
        raise DataError(f"task {name}: {where} has no rows")
    bad = next((i for i, r in zip(positions, rows, strict=True) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"task {name}: {where} row {bad} is not a mapping of columns to values")
    return rows, positions, where


def load_task(
    name: str, cfg: TaskConfig, train: bool = True, max_test: int | None = None, generate: bool = True
) -> Task:
    """Load and validate a task (its test split only with ``train=False``), capped by max_train/max_test
    after the optional ``sample_seed`` shuffle."""
    task = Task(name=name, cfg=cfg)
    splits = [("train", cfg.max_train)] if train else []
    splits.append(("test", min((x for x in (cfg.max_test, max_test) if x), default=None)))
    for kind, limit in splits:
        rows, positions, where = _sampled_rows(cfg, kind, name, limit, generate)
        setattr(task, kind, _examples(rows, positions, cfg, name, where, train=kind == "train"))
        if kind == "test" and cfg.scorer == "regex":
            _check_patterns(task, where)
    return task


def load_prompts(name: str, cfg: TaskConfig) -> Task:
    """A prompt set (its train split, capped by max_train): prompts only, for training phases whose
    teacher needs no demonstration (re-invocation)."""
    rows, positions, where = _sampled_rows(cfg, "train", name, cfg.max_train)
    prompt = cfg.columns.prompt
    train = [
        Example(index=i, prompt=_text(r, prompt, name, where, i, True) or "", demonstration=None, answer=None)
        for i, r in zip(positions, rows, strict=True)
    ]
    return Task(name=name, cfg=cfg, train=train)


def load_inputs(cfg: Config) -> tuple[dict[str, Task], dict[str, Task], Task | None]:
    """Every task, probe and (``sft_reinvoke``) prompt set of a run, loaded and validated: the run
    loads them before it builds or loads a model or writes its directory, so a bad file or row costs
    nothing but the error."""
    tasks = {n: load_task(n, t, train=True, max_test=cfg.eval.max_items) for n, t in cfg.task.items()}
    probes = {
        n: load_task(n, p, train=False, max_test=cfg.eval.max_items) for n, p in cfg.eval.probes.items()
    }
    prompts = None
    if isinstance(cfg.method, SFTReinvokeConfig):
        prompts = load_prompts("method.reinvoke.prompts", cfg.method.reinvoke.prompts)
    return tasks, probes, prompts


def _check_patterns(task: Task, where: str) -> None:
    """Every reference of a regex-scored task must compile; name the first row that does not."""
    from sdft_cli.scorers import alternatives

    for ex in task.test:
        for pattern in alternatives(ex.answer or ""):
            try:
                re.compile(pattern)
            except re.error as e:
                raise DataError(
                    f"task {task.name}: {where} row {ex.index}: invalid regex {pattern!r}: {e}"
                ) from None


def encode_target(tokenizer, messages: list[dict], demonstration: str, eos_ids: list[int]) -> list[int]:
    """The demonstration as the assistant's turn, as the chat template renders it, up to its end-of-turn.

    Rendering the whole conversation (not ``demonstration + eos``) trains the ending the template really
    produces, e.g. Gemma's ``<end_of_turn>`` rather than its tokenizer's ``<eos>``.
    """
    prompt = encode_messages(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        turn = [*messages, {"role": "assistant", "content": demonstration}]
        text = tokenizer.apply_chat_template(turn, tokenize=False)
        full = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if full[: len(prompt)] == prompt:
            target = full[len(prompt) :]
            end = next((i for i, t in enumerate(target) if t in eos_ids), None)
            if end is not None:
                return target[: end + 1]
    return list(tokenizer(demonstration, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def check_lengths(
    task: Task,
    tokenizer,
    context: int,
    rollout_tokens: int,
    template: str | None = None,
    target_eos: list[int] | None = None,
) -> None:
    """Fail before any work if a context leaves no room for its completion.

    Training rows: the student prompt (and with ``template`` the teacher context) plus ``rollout_tokens``;
    with ``target_eos`` (SFT) the prompt plus the demonstration. Test rows: the prompt plus the task's
    ``max_new_tokens``.
    """

    def fail(split: str, ex: Example, what: str, n: int, room: int, why: str) -> None:
        raise DataError(
            f"task {task.name}: {split} row {ex.index}: {what} is {n} tokens; the context of {context} "
            f"minus {why} leaves {room}"
        )

    for ex in task.train:
        msgs = task.student(ex)
        n = len(encode_messages(tokenizer, msgs))
        if n > context - rollout_tokens:
            fail("train", ex, "prompt", n, context - rollout_tokens, f"max_new_tokens {rollout_tokens}")
        if template is not None:
            t = len(encode_messages(tokenizer, task.teacher(ex, template)))
            if t > context - rollout_tokens:
                fail(
                    "train",
                    ex,
                    "teacher context",
                    t,
                    context - rollout_tokens,
                    f"max_new_tokens {rollout_tokens}",
                )
        if target_eos is not None:
            d = len(encode_target(tokenizer, msgs, ex.demonstration or "", target_eos))
            if n + d > context:
                fail("train", ex, "prompt + demonstration", n + d, context, "nothing")
    for ex in task.test:
        n = len(encode_messages(tokenizer, task.student(ex)))
        if n > context - task.cfg.max_new_tokens:
            room = context - task.cfg.max_new_tokens
            fail("test", ex, "prompt", n, room, f"max_new_tokens {task.cfg.max_new_tokens}")
