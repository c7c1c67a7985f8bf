"""Tasks: validated examples from a task's rows, and the input checks a run makes before any work.

A task row has a prompt, a demonstration (training rows) and a reference answer (test rows, read by the
task's scorer). Rows come from ``rows.load_rows``; contexts are rendered by ``prompts``. Every
message names the task, the split and the row at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from dataclasses import dataclass, field, replace

from sdft_cli.config import ColumnsConfig, Config, SDFTConfig, SFTReinvokeConfig, TaskConfig
from sdft_cli.errors import DataError
from sdft_cli.formats import FORMATS
from sdft_cli.names import resolve_teacher_template
from sdft_cli.prompts import encode_messages, encode_target, student_messages, teacher_messages
from sdft_cli.rows import json_type, load_rows
from sdft_cli.scorers import alternatives, check_tool_reference, normalize


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
    # validation rows (val_split, or val_fraction of train, never trained on); scored like test rows
    val: list[Example] = field(default_factory=list)
    # exclude_train_overlap: the test-pool questions left out because they are training questions
    excluded: int = 0

    def system(self, ex: Example) -> str | None:
        """The system message of both of ``ex``'s contexts."""
        return ex.system if ex.system is not None else self.cfg.system_prompt

    def student(self, ex: Example) -> list[dict]:
        return student_messages(ex.prompt, self.system(ex))

    def teacher(self, ex: Example, template: str) -> list[dict]:
        return teacher_messages(ex.prompt, ex.demonstration or "", template, self.system(ex), ex.context)


class JointTask(Task):
    """Every task's training rows as one task (``curriculum=joint``): each row keeps its own task's
    contexts (system message, teacher template) and the rows are shuffled together by the step batches.
    Its validation rows are each task's; evaluation scores the tasks themselves."""

    def __init__(self, parts: dict[str, Task], method_template: str | None):
        first = next(iter(parts.values()))
        longest = max(t.cfg.max_new_tokens for t in parts.values())
        cfg = replace(first.cfg, max_new_tokens=longest, teacher_template=None)
        super().__init__(name="joint", cfg=cfg, train=[ex for t in parts.values() for ex in t.train])
        self.parts = parts
        self._owner = {id(ex): t for t in parts.values() for ex in t.train}
        # each row's teacher template, resolved as the run resolves it for its own task
        self.templates = {
            n: resolve_teacher_template(method_template, t.cfg.teacher_template) for n, t in parts.items()
        }

    def system(self, ex: Example) -> str | None:
        return self._owner[id(ex)].system(ex)

    def teacher(self, ex: Example, template: str) -> list[dict]:
        """The row's own task's teacher context (``template``, resolved for the joint task, is unused)."""
        owner = self._owner[id(ex)]
        return owner.teacher(ex, self.templates[owner.name])


def _text(
    row: dict, column: str, *, task: str, where: str, i: int, required: bool, structured: bool = False
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
            f"task {task}: {where} row {i}: {column!r} must be text, not a JSON {json_type(value)} "
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
    out = []
    for i, r in zip(positions, rows, strict=True):
        at = {"task": task, "where": where, "i": i}
        out.append(
            Example(
                index=i,
                prompt=_text(r, cols.prompt, **at, required=True),  # type: ignore[arg-type]
                demonstration=_text(r, cols.demonstration, **at, required=train),
                answer=_text(r, cols.answer, **at, required=not train, structured=True),
                system=_text(r, "system", **at, required=False) if cfg.format != "columns" else None,
                context=_text(r, cols.context, **at, required=False),
            )
        )
    return out


def _sampled_rows(
    cfg: TaskConfig, kind: str, name: str, limit: int | None, generate: bool = True
) -> tuple[list[dict], list[int], str]:
    """The rows of one split, shuffled by ``sample_seed`` (when set), then capped at ``limit``; with
    each row's position in the split as read."""
    rows, where = load_rows(cfg, kind, name, generate)
    positions = list(range(len(rows)))
    if cfg.sample_seed is not None:
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
    after the optional ``sample_seed`` shuffle.

    With ``exclude_train_overlap`` the test pool first loses every question whose normalised text is a
    training question (of the whole train split), then is capped: the cap draws from the clean pool.
    """
    task = Task(name=name, cfg=cfg)
    exclude = cfg.exclude_train_overlap
    test_limit = min((x for x in (cfg.max_test, max_test) if x), default=None)
    seen: set[str] = set()
    if train or exclude:
        whole = exclude or bool(cfg.val_fraction)  # the cap applies after the split
        rows, positions, where = _sampled_rows(cfg, "train", name, None if whole else cfg.max_train, generate)
        examples = _examples(rows, positions, cfg, name, where, train=True)
        seen = {normalize(ex.prompt) for ex in examples} if exclude else set()
        if train and cfg.val_fraction:
            val = [ex for ex in examples if in_validation(ex.prompt, cfg.val_fraction)]
            examples = [ex for ex in examples if not in_validation(ex.prompt, cfg.val_fraction)]
            task.val = _validated(val[: cfg.max_val] if cfg.max_val else val, name, f"{where} (validation)")
        if train:
            task.train = examples[: cfg.max_train] if cfg.max_train else examples
            if not task.train:
                raise DataError(f"task {name}: {where}: val_fraction={cfg.val_fraction} leaves no train row")
    if train and cfg.val_split is not None:
        rows, positions, where_val = _sampled_rows(cfg, "val", name, cfg.max_val, generate)
        task.val = _validated(_examples(rows, positions, cfg, name, where_val, train=False), name, where_val)
    rows, positions, where = _sampled_rows(cfg, "test", name, None if exclude else test_limit, generate)
    test = _examples(rows, positions, cfg, name, where, train=False)
    if exclude:
        kept = [ex for ex in test if normalize(ex.prompt) not in seen]
        task.excluded = len(test) - len(kept)
        if not kept:
            raise DataError(f"task {name}: every row of {where} is also a training question")
        test = kept[:test_limit] if test_limit else kept
    task.test = test
    _check_references(task, where)
    return task


def in_validation(prompt: str, fraction: float) -> bool:
    """Whether a training row is held out for validation: a stable hash of its normalised prompt, so the
    split is the same in every process, run and row order, and duplicates fall on one side."""
    digest = hashlib.sha256(normalize(prompt).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _validated(val: list[Example], name: str, where: str) -> list[Example]:
    """Validation rows are scored: each needs a reference answer; at least one row."""
    if not val:
        raise DataError(f"task {name}: {where} has no rows (raise val_fraction or name a val_split)")
    missing = next((ex.index for ex in val if not ex.answer), None)
    if missing is not None:
        raise DataError(f"task {name}: {where} row {missing} has no reference answer to score")
    return val


def load_prompts(name: str, cfg: TaskConfig) -> Task:
    """A prompt set (its train split, capped by max_train): prompts only, for training phases whose
    teacher needs no demonstration (re-invocation)."""
    rows, positions, where = _sampled_rows(cfg, "train", name, cfg.max_train)
    prompt = cfg.columns.prompt
    train = [
        Example(
            index=i,
            prompt=_text(r, prompt, task=name, where=where, i=i, required=True) or "",
            demonstration=None,
            answer=None,
        )
        for i, r in zip(positions, rows, strict=True)
    ]
    return Task(name=name, cfg=cfg, train=train)


@dataclass(frozen=True)
class Inputs:
    """A run's data: the curriculum (ordered), the prior-capability probes, and the general-purpose
    prompt set of ``sft_reinvoke`` (None for the other methods)."""

    tasks: dict[str, Task]
    probes: dict[str, Task]
    prompts: Task | None = None


def load_inputs(cfg: Config) -> Inputs:
    """Every task, probe and (``sft_reinvoke``) prompt set of a run, loaded and validated: the run
    loads them before it builds or loads a model or writes its directory, so a bad file or row costs
    nothing but the error."""
    tasks = {n: load_task(n, t, train=True, max_test=cfg.eval.max_items) for n, t in cfg.task.items()}
    probes = {
        n: load_task(n, p, train=False, max_test=cfg.eval.max_items) for n, p in cfg.eval.probes.items()
    }
    for task in tasks.values():
        if task.excluded:
            print(f"[sdft] task {task.name}: {task.excluded} test questions are training questions, left out")
    prompts = None
    if isinstance(cfg.method, SFTReinvokeConfig):
        prompts = load_prompts("method.reinvoke.prompts", cfg.method.reinvoke.prompts)
    return Inputs(tasks, probes, prompts)


def check_inputs(cfg: Config, inputs: Inputs, tokenizer, eos_ids: list[int], context: int) -> None:
    """Before any work: every context leaves room for its completion within the model's ``context``
    (for SDFT the teacher's too, for SFT the demonstration), and the preconditions measurement has the
    demonstrations it needs."""
    sdft = isinstance(cfg.method, SDFTConfig)
    sampled = sdft or getattr(cfg.method, "targets", "") == "teacher"  # teacher contexts are decoded
    for task in inputs.tasks.values():
        template = None
        if sampled:
            template = resolve_teacher_template(cfg.method.teacher_template, task.cfg.teacher_template)
        rollout_tokens = cfg.rollout.max_new_tokens or task.cfg.max_new_tokens
        limit = cfg.method.max_prompt_tokens
        eos = None if sampled else eos_ids
        cut = check_lengths(task, tokenizer, context, rollout_tokens, template, eos, limit)
        if cut:
            print(
                f"[sdft] task {task.name}: {cut} training contexts are longer than method.max_prompt_tokens="
                f"{limit} and lose their first tokens (left truncation)",
                flush=True,
            )
    for probe in inputs.probes.values():
        check_lengths(probe, tokenizer, context, probe.cfg.max_new_tokens)
    if inputs.prompts is not None:  # the re-invocation prompts (sft_reinvoke)
        check_lengths(inputs.prompts, tokenizer, context, inputs.prompts.cfg.max_new_tokens)
    if cfg.eval.preconditions:
        check_demonstrations(list(inputs.tasks.values()))


def check_demonstrations(tasks: list[Task]) -> None:
    """The teacher context needs each test row's demonstration; fail before any work if one is missing."""
    for task in tasks:
        missing = [ex.index for ex in task.test if not ex.demonstration]
        if missing:
            raise DataError(
                f"eval.preconditions: task {task.name}: test row {missing[0]} has no demonstration "
                f"({len(missing)} of {len(task.test)} rows lack one); set eval.preconditions=false"
            )


def _check_references(task: Task, where: str) -> None:
    """References its scorer cannot read are reported with their row when the task loads: a regex that
    does not compile, a tool-call reference that is not a list of actions (test and validation rows)."""
    for rows, at in ((task.test, where), (task.val, "validation")):
        for ex in rows:
            if task.cfg.scorer == "regex":
                for pattern in alternatives(ex.answer or ""):
                    try:
                        re.compile(pattern)
                    except re.error as e:
                        raise DataError(
                            f"task {task.name}: {at} row {ex.index}: invalid regex {pattern!r}: {e}"
                        ) from None
            elif task.cfg.scorer in ("tool_call", "tool_call_strict"):
                why = check_tool_reference(ex.answer or "")
                if why:
                    raise DataError(
                        f"task {task.name}: {at} row {ex.index}: the tool-call reference is {why}"
                    )


def check_lengths(
    task: Task,
    tokenizer,
    context: int,
    rollout_tokens: int,
    template: str | None = None,
    target_eos: list[int] | None = None,
    max_prompt: int | None = None,
) -> int:
    """Fail before any work if a context leaves no room for its completion; returns how many training
    contexts ``max_prompt`` (left truncation, training only) cuts.

    Training rows: the student prompt (and with ``template`` the teacher context) plus ``rollout_tokens``;
    with ``target_eos`` (SFT) the prompt plus the demonstration. Test rows: the prompt plus the task's
    ``max_new_tokens``.
    """
    cut = 0

    def length(ids: list[int]) -> int:
        nonlocal cut
        if max_prompt is not None and len(ids) > max_prompt:
            cut += 1
            return max_prompt
        return len(ids)

    def fail(split: str, ex: Example, what: str, n: int, room: int, why: str) -> None:
        raise DataError(
            f"task {task.name}: {split} row {ex.index}: {what} is {n} tokens; the context of {context} "
            f"minus {why} leaves {room}"
        )

    for ex in task.train:
        msgs = task.student(ex)
        n = length(encode_messages(tokenizer, msgs))
        if n > context - rollout_tokens:
            fail("train", ex, "prompt", n, context - rollout_tokens, f"max_new_tokens {rollout_tokens}")
        if template is not None:
            t = length(encode_messages(tokenizer, task.teacher(ex, template)))
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
    for split, rows in (("test", task.test), ("validation", task.val)):
        for ex in rows:
            n = len(encode_messages(tokenizer, task.student(ex)))
            if n > context - task.cfg.max_new_tokens:
                room = context - task.cfg.max_new_tokens
                fail(split, ex, "prompt", n, room, f"max_new_tokens {task.cfg.max_new_tokens}")
    return cut
