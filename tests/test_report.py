"""Tests for sdft_cli.report: matrix files from long-format cells, and the terminal view."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from test_metrics import EXPECTED
from test_metrics import W as WORKED

from sdft_cli import report

TASKS = ["tool", "science", "medical"]
PRIORS = ["mmlu"]
# docs/metrics.md §6 worked example (columns: TASKS then PRIORS), shared with test_metrics.
W = WORKED.tolist()
META = {"method": "sdft", "seed": 7, "title": "worked example"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_cells(
    matrix: list[list[float]], stages: int | None = None, priors: list[str] = PRIORS
) -> list[dict]:
    """Long-format cells for rows 0..stages; each prior also gets a second, non-primary metric."""
    cells = []
    columns = [*TASKS, *priors]
    for i, row in enumerate(matrix[: (stages if stages is not None else len(TASKS)) + 1]):
        for name, value in zip(columns, row, strict=False):
            kind = "trained" if name in TASKS else "prior"
            base = {"stage": i, "stage_task": "base" if i == 0 else TASKS[i - 1], "eval_task": name}
            cells.append({**base, "kind": kind, "metric": "acc", "value": value, "n": 100, "stderr": 0.01})
            if kind == "prior":  # listed after the primary: kept in the CSV, ignored by the matrix
                cells.append(
                    {**base, "kind": kind, "metric": "acc_norm", "value": 0.99, "n": 100, "stderr": None}
                )
    return cells


def strict_json(text: str) -> dict:
    def reject(token: str) -> None:
        raise ValueError(f"non-strict JSON token {token}")

    return json.loads(text, parse_constant=reject)


# ----------------------------------------------------------------------------- build_matrix


def test_build_matrix_uses_primary_metric() -> None:
    R = report.build_matrix(make_cells(W), TASKS, PRIORS)
    np.testing.assert_array_equal(R, np.array(W))


def test_build_matrix_partial_keeps_full_curriculum_shape() -> None:
    R = report.build_matrix(make_cells(W, stages=1), TASKS, PRIORS)
    assert R.shape == (4, 4)
    np.testing.assert_array_equal(R[:2], np.array(W)[:2])
    assert np.isnan(R[2:]).all()


def test_build_matrix_rejects_stage_beyond_curriculum() -> None:
    cells = make_cells(W)
    cells.append({**cells[0], "stage": 4})
    with pytest.raises(ValueError, match="stage 4"):
        report.build_matrix(cells, TASKS, PRIORS)


# ----------------------------------------------------------------------------- write_matrix / load_matrix


def test_write_matrix_worked_example(tmp_path: Path) -> None:
    cells = make_cells(W)
    random.Random(0).shuffle(cells)  # the CSV must come out sorted anyway
    metrics = report.write_matrix(tmp_path, cells, TASKS, PRIORS, META)
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key

    with open(tmp_path / "matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert ",".join(rows[0]) == "method,seed,stage,stage_task,eval_task,eval_kind,metric,value,stderr,n"
    assert len(rows) - 1 == 4 * 4 + 4  # 16 matrix cells + 4 secondary prior metrics
    order = [(int(r[2]), [*TASKS, *PRIORS].index(r[4])) for r in rows[1:]]
    assert order == sorted(order)
    assert rows[1][:7] == ["sdft", "7", "0", "base", "tool", "trained", "acc"] and float(rows[1][7]) == 0.30
    assert sum(r[6] == "acc_norm" for r in rows[1:]) == 4

    text = (tmp_path / "matrix.json").read_text()
    data = strict_json(text)
    assert report.load_matrix(tmp_path) == data
    assert data["rows"] == ["base", "1:tool", "2:science", "3:medical"]
    assert data["columns"] == [*TASKS, *PRIORS]
    assert data["column_kinds"] == ["trained"] * 3 + ["prior"]
    np.testing.assert_allclose(data["values"], W)
    for key, value in EXPECTED.items():
        assert data["metrics"][key] == pytest.approx(value, abs=1e-12), key
    expected_norm = [[0, 0, 0], [0.9615, 0.1111, 0.0714], [1, 1, 0.1429], [0.5769, 0.7778, 1]]
    np.testing.assert_allclose(data["normalized"], expected_norm, atol=5e-5)
    assert "this run only" in data["normalized_note"]
    assert data["bwt_divisor"] == "T-1" and data["fwt_baseline"] == "row 0 (base model)"
    assert data["meta"] == META


def test_partial_matrix_json_is_strict(tmp_path: Path) -> None:
    metrics = report.write_matrix(
        tmp_path, make_cells(W, stages=1), TASKS, PRIORS, {**META, "lr": float("nan")}
    )
    assert metrics["stage"] == 1 and metrics["acc"] == pytest.approx(0.80) and math.isnan(metrics["bwt"])
    text = (tmp_path / "matrix.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = strict_json(text)
    assert data["rows"] == ["base", "1:tool"]
    assert len(data["values"]) == len(data["stderr"]) == len(data["normalized"]) == 2
    assert data["metrics"]["bwt"] is None and data["metrics"]["acc"] == pytest.approx(0.80)
    assert data["meta"]["lr"] is None
    assert len(data["columns"]) == 4  # full curriculum even after stage 1


def test_markdown_bold_diagonal_and_missing(tmp_path: Path) -> None:
    report.write_matrix(tmp_path, make_cells(W), TASKS, PRIORS, META)
    md = (tmp_path / "matrix.md").read_text()
    assert "| 1: tool | **80.0** | 45.0 | 25.0 | 60.0 |" in md
    assert "**85.0**" in md and "**90.0**" in md
    assert "**30.0**" not in md and "**60.0**" not in md  # base row and off-diagonal stay plain
    table = [line for line in md.splitlines() if line.startswith("| ") and "stage" not in line][:4]
    assert len(table) == 4 and table[0].startswith("| base |")
    assert "prior:mmlu" in md and not any("–" in line for line in table)
    assert "0.7500" in md and "-0.1500" in md and "T-1" in md and "row 0 (base model)" in md

    cells = [c for c in make_cells(W, stages=2) if not (c["stage"] == 2 and c["eval_task"] == "medical")]
    report.write_matrix(tmp_path, cells, TASKS, PRIORS, META)
    md = (tmp_path / "matrix.md").read_text()
    table = md.split("## Metrics")[0]
    assert "| 2: science | 82.0 | **85.0** | – | 58.0 |" in table
    assert "3: medical" not in table


def test_png(tmp_path: Path) -> None:
    report.write_matrix(tmp_path, make_cells(W), TASKS, PRIORS, META)
    png = (tmp_path / "matrix.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    report.write_matrix(tmp_path, make_cells(W, stages=1), TASKS, PRIORS, META)
    small = (tmp_path / "matrix.png").read_bytes()
    assert small.startswith(PNG_SIGNATURE) and len(small) > 5_000 and small != png


def test_no_priors(tmp_path: Path) -> None:
    cells = make_cells([row[:3] for row in W], priors=[])
    metrics = report.write_matrix(tmp_path, cells, TASKS, [], META)
    assert metrics["acc"] == pytest.approx(0.75) and math.isnan(metrics["prior_avg"])
    data = report.load_matrix(tmp_path)
    assert "prior" not in report.render_markdown(data).split("## Metrics")[0]
    console = Console(record=True, width=200)
    report.print_matrix(data, console)
    out = console.export_text()
    assert "medical" in out and "Prior avg" not in out and "║" not in out
    assert (tmp_path / "matrix.png").read_bytes().startswith(PNG_SIGNATURE)


def test_print_matrix(tmp_path: Path) -> None:
    report.write_matrix(tmp_path, make_cells(W), TASKS, PRIORS, META)
    console = Console(record=True, width=200)
    report.print_matrix(report.load_matrix(tmp_path), console)
    out = console.export_text(clear=False)
    for name in [*TASKS, "mmlu", "base", "worked example"]:
        assert name in out, name
    assert "ACC" in out and "0.7500" in out and "0.0750" in out
    assert "║" in out  # spacer column before the prior probes
    assert "BWT -0.1500" in out and "stage 3/3" in out  # one metrics line, not swallowed as markup
    styled = console.export_text(styles=True)
    bold = set(re.findall(r"\x1b\[1m *(\d+\.\d)\x1b\[0m", styled.split("Metrics")[0]))
    assert bold == {"80.0", "85.0", "90.0"}  # diagonal bold, nothing else in the body


def test_print_matrix_partial(tmp_path: Path) -> None:
    report.write_matrix(tmp_path, make_cells(W, stages=1), TASKS, PRIORS, META)
    console = Console(record=True, width=200)
    report.print_matrix(report.load_matrix(tmp_path), console)
    out = console.export_text()
    assert "1: tool" in out and "2: science" not in out and "0.8000" in out


def test_load_matrix_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="matrix.json"):
        report.load_matrix(tmp_path / "nowhere")
