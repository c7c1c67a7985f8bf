"""Sweep comparison: grouping by overrides, Student-t intervals, the report's numbers."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from sdft_cli import compare
from sdft_cli.report import write_matrix

TASKS, PRIORS = ["a", "b"], ["p"]


def make_run(root: Path, overrides: list[str], R: list[list[float]], kl: list[float], seed: int) -> Path:
    run = root / ",".join(overrides)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    cols = TASKS + PRIORS
    cells = [
        {
            "stage": i,
            "stage_task": "base" if i == 0 else TASKS[i - 1],
            "eval_task": c,
            "kind": "trained" if c in TASKS else "prior",
            "metric": "exact_match",
            "value": R[i][j],
            "n": 10,
            "stderr": 0.0,
        }
        for i in range(len(R))
        for j, c in enumerate(cols)
    ]
    meta = {
        "method": overrides[0].split("=")[1],
        "seed": seed,
        "kl_to_base": {f"{i + 1}:{t}": kl[i] for i, t in enumerate(TASKS)},
        "kl_model_base": {f"{i + 1}:{t}": 2 * kl[i] for i, t in enumerate(TASKS)},
    }
    write_matrix(run, cells, TASKS, PRIORS, meta)
    return run


def test_mean_ci_matches_the_t_interval_by_hand():
    x = [0.2, 0.5, 0.35]
    mean, half, n = compare.mean_ci(x)
    # t_{0.975, 2} = 4.302652729911275 (tables)
    assert n == 3 and mean == pytest.approx(statistics.mean(x))
    assert half == pytest.approx(4.302652729911275 * statistics.stdev(x) / math.sqrt(3))
    assert compare.mean_ci([0.4])[:2] == (0.4, pytest.approx(float("nan"), nan_ok=True))
    assert compare.mean_ci([float("nan"), None, 1.0, 3.0])[2] == 2


def test_runs_group_by_overrides_without_the_seed(tmp_path):
    rng = np.random.default_rng(0)
    finals = {}
    for method in ("sdft", "sft"):
        for seed in range(3):
            R = rng.uniform(size=(3, 3)).round(3).tolist()
            finals.setdefault(method, []).append(R)
            overrides = [f"method={method}", f"seed={seed}", "experiment=toy_world", "method.epochs=4"]
            make_run(tmp_path, overrides, R, kl=[0.1 * (seed + 1), 0.2], seed=seed)
    groups = compare.collect(tmp_path)
    # fixed settings (method.epochs=4, experiment) do not appear in the labels
    assert sorted(g.label for g in groups) == ["method=sdft", "method=sft"]
    summary = compare.summarize(groups)
    for method, Rs in finals.items():
        head = summary["groups"][f"method={method}"]["headline"]
        acc = [(R[2][0] + R[2][1]) / 2 for R in Rs]
        new = [(R[1][0] + R[2][1]) / 2 for R in Rs]
        prior_delta = [R[2][2] - R[0][2] for R in Rs]
        assert head["acc"][:2] == pytest.approx(compare.mean_ci(acc)[:2])
        assert head["new_task"][0] == pytest.approx(statistics.mean(new))
        assert head["prior_delta"][0] == pytest.approx(statistics.mean(prior_delta))
        assert head["kl_to_base"][0] == pytest.approx(
            statistics.mean([(0.1 * (s + 1) + 0.2) / 2 for s in range(3)])
        )
        stage1 = summary["groups"][f"method={method}"]["stages"][1]
        assert stage1["kl_model_base"][0] == pytest.approx(2 * statistics.mean([0.1, 0.2, 0.3]))
        assert summary["groups"][f"method={method}"]["seeds"] == [0, 1, 2]
    text = compare.render_markdown(summary)
    assert "| method=sdft | 3 |" in text and "| method=sft | 3 |" in text


def test_a_swept_setting_splits_groups_and_write_report_writes_both_files(tmp_path):
    R = [[0.0, 0.0, 1.0], [0.5, 0.0, 0.9], [0.4, 0.6, 0.8]]
    for lr in ("1e-4", "3e-4"):
        for seed in (0, 1):
            make_run(tmp_path, ["method=sft", f"method.optim.lr={lr}", f"seed={seed}"], R, [1.0, 1.0], seed)
    path = compare.write_report(tmp_path)
    assert path == tmp_path / "comparison.md" and (tmp_path / "comparison.json").is_file()
    text = path.read_text()
    assert "method.optim.lr=1e-4" in text and "method.optim.lr=3e-4" in text
    # identical runs: zero-width intervals
    assert "| method.optim.lr=1e-4 | 2 | 55.0 ± 0.0 | 50.0 ± 0.0 |" in text


def test_no_runs_is_a_clear_error(tmp_path):
    from sdft_cli.errors import RunDirError

    with pytest.raises(RunDirError, match="no runs"):
        compare.collect(tmp_path)
    with pytest.raises(RunDirError, match="no such directory"):
        compare.collect(tmp_path / "missing")


def test_the_sweep_selects_per_method_on_validation_never_on_test(tmp_path):
    """Per method, the learning rate with the highest mean validation score (mean over tasks, then over
    seeds) is selected, although another learning rate has the higher test score."""
    import json

    val = {
        ("sft", "1e-5"): [0.6, 0.5, 0.7],
        ("sft", "5e-5"): [0.4, 0.5, 0.45],
        ("sdft", "1e-5"): [0.3, 0.2, 0.1],
    }
    val[("sdft", "5e-5")] = [0.3, 0.2, 0.1]  # a tie: the first label in order wins
    for (method, lr), scores in val.items():
        for seed, v in enumerate(scores):
            test = 0.9 if lr == "5e-5" else 0.2  # the test ranking is the opposite
            R = [[0.0, 0.0, 0.5], [test, 0.0, 0.5], [test, test, 0.5]]
            run = make_run(
                tmp_path, [f"method={method}", f"method.optim.lr={lr}", f"seed={seed}"], R, [0, 0], seed
            )
            for i, task in enumerate(TASKS, start=1):
                sel = run / f"t{i:02d}_{task}" / "train" / ("sft" if i == 2 else "") / "selection.json"
                sel.parent.mkdir(parents=True, exist_ok=True)
                sel.write_text(json.dumps({"rule": "best_val", "val": v + (0.1 if i == 1 else -0.1)}))
    summary = compare.summarize(compare.collect(tmp_path))
    sel = summary["selection"]
    assert sel["method=sft"]["selected"] == "method.optim.lr=1e-5,method=sft"
    assert sel["method=sft"]["val"] == pytest.approx(statistics.mean(val[("sft", "1e-5")]))
    assert sel["method=sdft"]["selected"] == "method.optim.lr=1e-5,method=sdft"
    assert sel["method=sft"]["candidates"]["method.optim.lr=5e-5,method=sft"] == pytest.approx(0.45)
    group = summary["groups"]["method.optim.lr=1e-5,method=sft"]
    assert group["val"][:2] == pytest.approx(compare.mean_ci(val[("sft", "1e-5")])[:2])
    report = compare.render_markdown(summary)
    assert "## Selected on validation" in report
    assert "| method=sft | method.optim.lr=1e-5,method=sft | 60.0 |" in report
    # a run without validation scores: its group cannot be selected
    (tmp_path / "method=sft,method.optim.lr=1e-5,seed=0" / "t01_a" / "train" / "selection.json").unlink()
    sel = compare.summarize(compare.collect(tmp_path))["selection"]["method=sft"]
    assert sel["selected"] == "method.optim.lr=5e-5,method=sft"
    assert sel["candidates"]["method.optim.lr=1e-5,method=sft"] is None


def test_a_run_not_finished_is_left_out_of_the_final_figures_and_named(tmp_path):
    """A sweep read while one of its runs is still going (matrix.json holds only its finished rows)."""
    R = [[0.0, 0.0, 1.0], [0.5, 0.0, 0.9], [0.4, 0.6, 0.8]]
    for seed in (0, 1):
        make_run(tmp_path, ["method=sdft", f"seed={seed}"], R, [1.0, 1.0], seed)
    make_run(tmp_path, ["method=sdft", "seed=2"], [[0.0, 0.0, 1.0], [0.9, 0.1, 0.2]], [1.0, 1.0], 2)
    summary = compare.summarize(compare.collect(tmp_path))
    g = summary["groups"]["method=sdft"]
    # the final figures: the two finished runs only (the partial run's stage-1 prior would pull them down)
    assert g["headline"]["prior_avg"][0] == pytest.approx(0.8) and g["headline"]["prior_avg"][2] == 2
    assert g["unfinished"] == [{"seed": 2, "stage": 1, "of": 2, "run": str(tmp_path / "method=sdft,seed=2")}]
    # the per-stage table counts it where it got to
    assert g["stages"][1]["task_acc"][0] == pytest.approx((0.5 + 0.5 + 0.9) / 3)
    assert g["stages"][2]["task_acc"][2] == 2
    text = compare.render_markdown(summary)
    assert "| method=sdft | 2 |" in text and "method=sdft seed 2 at stage 1 of 2" in text
