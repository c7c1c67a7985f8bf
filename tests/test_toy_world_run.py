"""`sdft run experiment=toy_world`, reduced: pretraining from scratch, the preconditions, SDFT and SFT,
the comparison report. The full-size experiment and its figures are in docs/toy_world.md."""

from __future__ import annotations

import json

import yaml
from conftest import sdft

# A smaller model, a shorter pretraining and one task; everything else is the experiment's own config.
REDUCED = [
    "model.toy.hidden_size=64",
    "model.toy.num_layers=2",
    "model.toy.intermediate_size=128",
    "model.toy.steps=600",
    "model.toy.batch_size=32",
    "task=[swap]",
    "eval.probes.rev.max_test=32",
    "eval.probes.sort.max_test=32",
    "seed=0",
    "logger.progress=false",
]


def test_toy_world_reduced_end_to_end(tmp_path, offline_env):
    out = sdft("run", "experiment=toy_world", f"runs_root={tmp_path}", *REDUCED, cwd=tmp_path, timeout=900)
    sweep = tmp_path / "toy_world"
    runs = {
        yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())[0]: d
        for d in sweep.iterdir()
        if (d / ".hydra").is_dir()
    }
    assert set(runs) == {"method=sdft", "method=sft"}, sorted(runs)

    # the paper's precondition, after pretraining: the teacher with the demonstration is far ahead
    pre = json.loads((runs["method=sdft"] / "t00_base/preconditions/preconditions.json").read_text())["swap"]
    assert pre["student"] <= 0.05 and pre["teacher"] >= 0.5, pre
    assert pre["teacher_kl_model_base_token"] > 0 and pre["teacher_kl_to_base_token"] > 0
    assert "preconditions (paper Sec. 3.2)" in out.stdout

    # one SDFT task raises that task's accuracy well above the base
    R = json.loads((runs["method=sdft"] / "matrix.json").read_text())["values"]
    assert R[1][0] >= R[0][0] + 0.25, R

    # both methods' matrices and the comparison report
    for d in runs.values():
        assert (d / "matrix.md").is_file() and (d / "matrix.png").is_file()
    report = (sweep / "comparison.md").read_text()
    assert "| method=sdft | 1 |" in report and "| method=sft | 1 |" in report
    assert "## Preconditions" in report
    # the multirun's callback also wrote the continual-learning report
    report = json.loads((sweep / "report.json").read_text())
    assert (sweep / "report.html").is_file() and "fig4_pareto" in report["figures"]
    assert report["groups"]["method=sdft"]["metrics"]["new_task"]["mean"] == R[1][0]
    summary = json.loads((sweep / "comparison.json").read_text())
    assert summary["groups"]["method=sdft"]["headline"]["new_task"][0] == R[1][0]
