"""curriculum=single (each task alone from the base) and curriculum=joint (every task's rows in one
stage): the references the report reads for intransigence and the multi-task ceiling."""

from __future__ import annotations

import json

from conftest import SMOKE, sdft

from sdft_cli.compose import compose
from sdft_cli.names import resolve_teacher_template
from sdft_cli.tasks import JointTask, load_inputs


def test_a_joint_task_holds_every_row_in_its_own_tasks_contexts():
    cfg = compose([*SMOKE, "task=[facts,mcq]"])
    tasks = load_inputs(cfg).tasks
    joint = JointTask(tasks, None)
    assert len(joint.train) == sum(len(t.train) for t in tasks.values())
    assert joint.cfg.max_new_tokens == max(t.cfg.max_new_tokens for t in tasks.values())
    for task in tasks.values():
        template = resolve_teacher_template(None, task.cfg.teacher_template)
        for ex in task.train[:3]:
            assert joint.student(ex) == task.student(ex)
            assert joint.teacher(ex, "ignored") == task.teacher(ex, template)
    # a method-wide template applies to every row, as it does to every task
    forced = JointTask(tasks, "paper")
    ex = tasks["facts"].train[0]
    assert forced.teacher(ex, "x") == tasks["facts"].teacher(ex, resolve_teacher_template("paper", None))


def test_single_and_joint_curricula_run_end_to_end(tmp_path, tiny_model_dir):
    args = [*SMOKE, "task=[facts,mcq]", "eval.max_items=2", "rollout.max_new_tokens=4"]
    sdft("run", *args, "curriculum=single", "run_dir=single", cwd=tmp_path)
    single = tmp_path / "single"
    matrix = json.loads((single / "matrix.json").read_text())
    assert matrix["rows"] == ["base", "1:facts", "2:mcq"] and matrix["meta"]["curriculum"] == "single"
    # the second task trained from the base, not from the first task's model
    drift = json.loads((single / "t02_mcq" / "eval" / "drift.json").read_text())
    assert drift["weights"]["to_previous"] == drift["weights"]["to_base"] > 0
    sdft("run", *args, "curriculum=joint", "run_dir=joint", cwd=tmp_path)
    joint = tmp_path / "joint"
    matrix = json.loads((joint / "matrix.json").read_text())
    assert matrix["rows"] == ["base", "1:joint"] and matrix["columns"][:2] == ["facts", "mcq"]
    assert (joint / "t01_joint" / "train" / "manifest.json").is_file()
    assert not (joint / "t01_facts").exists() and len(matrix["values"]) == 2
