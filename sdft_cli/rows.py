"""Rows of a task split as plain dicts, from wherever they live: bundled files, local JSON/CSV/Parquet,
the hub, a ``save_to_disk`` copy, the toy world or a knowledge corpus (``task.<name>.source``).

Everything goes through `datasets` (the real loading path for local and hub data). Local text files are
checked first, so a file that is empty, not UTF-8 or not JSON Lines is one error naming its line.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
from pathlib import Path

from sdft_cli import knowledge
from sdft_cli.config import TaskConfig
from sdft_cli.errors import ConfigError, DataError
from sdft_cli.toy import world


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


def load_rows(cfg: TaskConfig, kind: str, task: str, generate: bool = True) -> tuple[list[dict], str]:
    """Rows of the ``train``, ``test`` or ``val`` split as dicts, through `datasets` (the real loading
    path for local and hub data).

    ``generate=False``: a knowledge task whose QA pairs are not generated yet fails instead of calling
    the generator (``sdft plan``).
    """
    import datasets

    datasets.disable_progress_bars()
    split = {"train": cfg.train_split, "test": cfg.test_split, "val": cfg.val_split}[kind]
    if split is None:
        raise ValueError(f"task {task} has no {kind} split")
    if kind == "test" and cfg.test_path:  # the test split from another dataset
        cfg = dataclasses.replace(cfg, path=cfg.test_path, subset=cfg.test_subset, test_path=None)
    if cfg.source == "toy":
        return _toy_rows(cfg, split, task), f"toy world {cfg.path}[{split}]"
    if cfg.source == "knowledge":
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
                    f"task {task}: {path} item {bad} is a JSON {json_type(doc[bad])}, not an object"
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
                f"task {task}: {path} line {n} is a JSON {json_type(row)}, not an object of columns"
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


def json_type(value: object) -> str:
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
    if cfg.path not in world.SKILLS:
        raise ConfigError(
            f"task {task}: no toy-world skill {cfg.path!r} (available: {', '.join(world.SKILLS)})"
        )
    if split not in world.DEFAULT_ROWS:
        raise ConfigError(f"task {task}: toy-world splits are {', '.join(world.DEFAULT_ROWS)}, not {split!r}")
    style = cfg.subset or "plain"
    if style not in world.STYLES:
        raise ConfigError(f"task {task}: subset (the demonstration style) must be one of {world.STYLES}")
    limit = {cfg.train_split: cfg.max_train, cfg.test_split: cfg.max_test}.get(split, cfg.max_val)
    return world.rows(cfg.path, split, limit or world.DEFAULT_ROWS[split], style=style)
