"""Validation splits, periodic evaluation during a task and the choice of the checkpoint that ends it
(``select=last|best_val``): the split is disjoint from train and stable, the choice is the argmax of the
validation records (ties to the earlier step), the weights chosen are the ones evaluated, and a run
killed around an evaluation ends as if never interrupted."""

from __future__ import annotations

import json

import pytest
from conftest import assert_names, sdft, write_jsonl
from crash_harness import RUN_ARGS, F, Harness
from test_toy_world_run import REDUCED

from sdft_cli import validation
from sdft_cli.compose import compose
from sdft_cli.config import TaskConfig
from sdft_cli.errors import ConfigError
from sdft_cli.tasks import in_validation, load_task, normalize


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"Question {i}?", "demonstration": f"d{i}", "answer": f"a{i}"} for i in range(n)]


def test_a_validation_fraction_is_a_stable_hash_of_the_prompt_disjoint_from_train(tmp_path):
    rows = _rows(400)
    rows[7]["prompt"] = "  QUESTION 3 ? "  # a duplicate of row 3 after normalisation
    write_jsonl(tmp_path / "t" / "train.jsonl", rows)
    write_jsonl(tmp_path / "t" / "test.jsonl", _rows(4))
    cfg = TaskConfig(source="json", path=str(tmp_path / "t"), val_fraction=0.2)
    task = load_task("t", cfg)
    train, val = {ex.index for ex in task.train}, {ex.index for ex in task.val}
    assert train.isdisjoint(val) and len(train) + len(val) == 400
    assert 50 <= len(val) <= 110  # ~80 expected of a fair hash
    assert all(in_validation(ex.prompt, 0.2) for ex in task.val)
    assert (3 in val) == (7 in val)  # duplicates on one side
    assert normalize(rows[7]["prompt"]) == normalize(rows[3]["prompt"])
    # the same rows whatever the row order and in every load; max_train caps what is left after the split
    shuffled = load_task("t", TaskConfig(**{**cfg.__dict__, "sample_seed": 5, "max_train": 30}))
    assert {ex.index for ex in shuffled.val} == val and len(shuffled.train) == 30
    assert {ex.index for ex in shuffled.train} <= train
    # a validation row is scored: it needs a reference answer
    rows[next(iter(sorted(val)))].pop("answer")
    write_jsonl(tmp_path / "t" / "train.jsonl", rows)
    with pytest.raises(Exception, match="validation.*no reference answer"):
        load_task("t", cfg)


def test_select_best_val_needs_periodic_validation_of_every_task():
    base = ["experiment=toy_world", "hydra.mode=RUN", "method=sdft"]
    with pytest.raises(ConfigError) as e:
        compose([*base, "select=best_val"])
    assert_names(e, "select=best_val", "eval.every_steps")
    with pytest.raises(ConfigError) as e:
        compose([*base, "select=best_val", "eval.every_steps=4", "eval.periodic=[test]"])
    assert_names(e, "eval.periodic")
    with pytest.raises(ConfigError) as e:
        compose([*base, "select=best_val", "eval.every_steps=4", "task.drop.val_split=null"])
    assert_names(e, "task.drop.val_split", "task.drop.val_fraction")
    with pytest.raises(ConfigError) as e:
        compose([*base, "select=best"])
    assert_names(e, "select")
    with pytest.raises(ConfigError) as e:
        compose([*base, "task.drop.val_fraction=0.1"])
    assert_names(e, "task.drop", "val_split or val_fraction")
    cfg = compose([*base, "select=best_val", "eval.every_steps=4"])
    assert cfg.select == "best_val" and cfg.eval.periodic == ["val"]


def _record(step: int, score: float | None) -> dict:
    rec = {"stage": 1, "task": "t", "step": step}
    if score is not None:
        rec["val"] = {"t": {"metric": "exact_match", "value": score, "n": 10}}
    return rec


def test_the_best_record_is_the_highest_validation_score_and_ties_go_to_the_earlier_step(tmp_path):
    records = [_record(2, 0.1), _record(4, 0.5), _record(6, 0.5), _record(8, None), _record(10, 0.3)]
    assert validation.best_record(records)["step"] == 4
    assert validation.best_record([_record(2, None)]) is None
    # commit marks a record best only on a strict improvement over every earlier one
    periodic = validation.Periodic(every=2, select="last", task=None, evals=None)  # type: ignore[arg-type]
    for rec in records:
        validation.commit(periodic, tmp_path, dict(rec), model=None)  # type: ignore[arg-type]
    kept = validation.read_records(tmp_path)
    assert [r["best"] for r in kept] == [True, True, False, False, False]
    assert [r["checkpoint"] for r in kept] == [None] * 5  # select=last keeps no weights of its own
    (tmp_path / validation.RECORDS).write_text((tmp_path / validation.RECORDS).read_text() + '{"torn')
    assert len(validation.read_records(tmp_path)) == 5  # a torn last line is ignored


@pytest.fixture(scope="module")
def best_val_run(tmp_path_factory, offline_env):
    """One reduced toy-world SDFT task with periodic evaluation on validation and test, select=best_val."""
    root = tmp_path_factory.mktemp("best_val")
    args = [*REDUCED, "task=[drop]", "hydra.mode=RUN", "method=sdft", f"run_dir={root / 'run'}"]
    args += ["select=best_val", "eval.every_steps=8", "eval.periodic=[val,test]"]
    out = sdft("run", "experiment=toy_world", *args, cwd=root, timeout=900)
    return root / "run", out


def test_best_val_ends_the_task_with_the_weights_that_scored_highest_on_validation(best_val_run):
    run, out = best_val_run
    train = run / "t01_drop" / "train"
    records = validation.read_records(train)
    manifest = json.loads((train / "manifest.json").read_text())
    total = manifest["steps"]
    assert [r["step"] for r in records] == sorted({*range(8, total + 1, 8), total})
    scores = [r["val"]["drop"]["value"] for r in records]
    assert len(set(scores)) > 1, scores  # the task is learned during the stage: the choice is not moot
    best = max(range(len(records)), key=lambda i: (scores[i], -i))  # brute force: first argmax
    chosen = json.loads((train / "selection.json").read_text())
    assert chosen == manifest["selected"]
    assert chosen["step"] == records[best]["step"] and chosen["val"] == scores[best]
    assert chosen["rule"] == "best_val" and chosen["last_val"] == scores[-1]
    kept = f"best_step_{chosen['step']:06d}"
    assert chosen["weights"] == ("last" if records[best]["step"] == total else kept)
    assert records[-1]["checkpoint"] == "model"
    # the stage's model is the one that was evaluated at the chosen step: the stage evaluation's test score
    # equals that step's periodic test score (both greedy, same weights, same test rows)
    matrix = json.loads((run / "matrix.json").read_text())
    assert matrix["values"][1][0] == records[best]["test"]["drop"]["value"]
    if chosen["weights"] != "last":
        assert f"ends the task with step {chosen['step']} of {total}" in out.stdout
    # the test split never decides: every record holds both, the choice follows validation alone
    assert all(set(r) >= {"val", "test", "best", "checkpoint"} for r in records)
    # metrics.jsonl: one periodic record per evaluation; they do not advance the optimizer-step counter
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in log if r.get("event") == "periodic"]
    assert [r["step"] for r in periodic] == [r["step"] for r in records]
    assert all(r["global_step"] == r["step"] for r in periodic)
    assert periodic[0]["val/drop/exact_match"] == scores[0]
    assert not (train / "checkpoints").exists()


def test_a_run_killed_around_periodic_evaluations_ends_as_if_never_interrupted(
    tmp_path_factory, tiny_model_dir
):
    """Smoke run (2 tasks x 2 steps, a checkpoint after step 1), evaluated on validation after every step,
    select=best_val: a random model scores 0 throughout, so step 1's kept weights end each task."""
    args = [*RUN_ARGS, "eval.every_steps=1", "select=best_val"]
    args += [f"task.{t}.max_val=3" for t in ("facts", "mcq")]  # their bundled validation splits
    harness = Harness(tmp_path_factory.mktemp("crash_val"), args=args)
    ref = harness.make_reference()
    chosen = json.loads((ref / "t01_facts" / "train" / "selection.json").read_text())
    assert (chosen["step"], chosen["weights"]) == (1, "best_step_000001")
    faults = [
        # task 1, step 1 evaluated and checkpointed, not recorded: the resumed run evaluates it again
        F("evaluation", "sdft_cli.validation:commit", 1),
        # task 2, step 2 recorded, its final weights not yet chosen
        F("evaluation", "sdft_cli.validation:select", 2),
    ]
    outcome = harness.trial("val", faults, max_restarts=2)
    assert [launch.killed for launch in outcome.launches[:2]] == [True] * 2, outcome.landed
    assert outcome.recovered, outcome.launches[-1].output[-3000:]
    assert outcome.mismatches == [] and outcome.lost == []
    for stage in ("t01_facts", "t02_mcq"):
        mine, theirs = (d / stage / "train" / validation.RECORDS for d in (harness.work / "val", ref))
        assert mine.read_text() == theirs.read_text()


def test_plan_counts_validation_rows_and_periodic_evaluations(tmp_path):
    args = ["experiment=toy_world", "hydra.mode=RUN", "method=sdft", "select=best_val", "eval.every_steps=12"]
    plan = json.loads(sdft("plan", *args, "--json", cwd=tmp_path).stdout)
    for t in plan["tasks"]:
        assert t["n_val"] == 64 and t["periodic"] == -(-t["steps"] // 12)  # every 12 steps and the last
    assert plan["periodic_generations"] == sum(t["periodic"] * t["n_val"] for t in plan["tasks"])
    text = sdft("plan", *args, cwd=tmp_path).stdout
    assert "drop: 64 validation rows (never trained on), scored" in text
