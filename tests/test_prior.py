"""The lm-eval prior-capability suite: pre-checks, result extraction, and a real offline run whose score
lands in the matrix and matches a brute-force scoring of the same checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, SMOKE, sdft

from sdft_cli.compose import compose
from sdft_cli.config import BenchmarkConfig, PriorConfig
from sdft_cli.errors import ConfigError, DataError
from sdft_cli.prior import cells, check, runs_at

FIXTURES = REPO / "tests" / "fixtures" / "lm_eval"


def local_tasks(tmp_path: Path) -> Path:
    """The fixture task YAMLs with the data file's absolute path written in."""
    out = tmp_path / "lm_tasks"
    out.mkdir(exist_ok=True)
    data = FIXTURES / "arith.jsonl"
    for name in ("arith", "unsafe"):
        text = (FIXTURES / f"{name}.yaml.in").read_text().replace("@DATA@", str(data))
        (out / f"{name}.yaml").write_text(text)
    return out


def brute_force_accuracy(model_dir: Path) -> float:
    """Multiple-choice accuracy by summing each choice's token log-probs after the question (float64)."""
    from sdft_cli.models import load_model, load_tokenizer

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    rows = [json.loads(line) for line in (FIXTURES / "arith.jsonl").read_text().splitlines()]
    correct = 0
    for row in rows:
        context = f"Question: {row['question']}\nAnswer:"
        scores = []
        for choice in row["choices"]:
            whole = tok(context + " " + choice, add_special_tokens=False)["input_ids"]
            start = len(tok(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            scores.append(sum(float(logp[t - 1, whole[t]]) for t in range(start, len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return correct / len(rows)


def test_paper_suite_config_and_the_dotted_alias():
    cfg = compose(["eval.prior=paper"]).eval.prior
    assert {n: (b.task, b.metric) for n, b in cfg.benchmarks.items()} == {
        "hellaswag": ("hellaswag", "acc,none"),
        "humaneval": ("humaneval", "pass@1,create_test"),
        "ifeval": ("ifeval", "inst_level_loose_acc,none"),
        "mmlu": ("mmlu", "acc,none"),
        "truthfulqa": ("truthfulqa_mc1", "acc,none"),
        "winogrande": ("winogrande", "acc,none"),
    }
    assert not cfg.confirm_run_unsafe_code and cfg.backend == "hf"
    dropped = compose(["eval/prior=paper", "~eval.prior.benchmarks.humaneval"]).eval.prior
    assert "humaneval" not in dropped.benchmarks and len(dropped.benchmarks) == 5
    assert compose([]).eval.prior.benchmarks == {}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.prior.limit=1.5"], "eval.prior.limit must be a count or a fraction"),
        (["eval.prior.backend=sglang"], "eval.prior.backend='sglang' is not one of"),
        (["+eval.prior.benchmarks.x.task=hellaswag", "+eval.prior.benchmarks.x.metric=acc"], "'acc,none'"),
        (["+eval.prior.benchmarks.capitals.task=hellaswag"], "share names: ['capitals']"),
        (["+eval.prior.benchmarks.x={tsk: hellaswag}"], "benchmarks.x: unknown key(s) ['tsk']"),
        (["+eval.prior.benchmarks.x={metric: 'acc,none'}"], "benchmarks.x.task: name the lm-eval task"),
    ],
)
def test_bad_prior_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        compose(overrides)
    assert message in str(e.value)


def test_runs_at_every_stage_or_the_ends():
    cfg = PriorConfig(benchmarks={"hs": BenchmarkConfig(task="hellaswag")})
    assert [runs_at(cfg, s, 3) for s in range(4)] == [True] * 4
    cfg.stages = "ends"
    assert [runs_at(cfg, s, 3) for s in range(4)] == [True, False, False, True]
    assert not runs_at(PriorConfig(), 0, 3)


def test_cells_pick_the_configured_metric_and_name_what_is_missing():
    cfg = PriorConfig(
        benchmarks={
            "ifeval": BenchmarkConfig(task="ifeval", metric="inst_level_loose_acc,none"),
            "tqa": BenchmarkConfig(task="truthfulqa_mc1"),
        }
    )
    results = {
        "results": {
            "ifeval": {"inst_level_loose_acc,none": 0.75, "inst_level_loose_acc_stderr,none": "N/A"},
            "truthfulqa_mc1": {"acc,none": 0.5, "acc_stderr,none": 0.02},
        },
        "n-samples": {"ifeval": {"original": 541, "effective": 100}},
    }
    got = {c["eval_task"]: c for c in cells(cfg, results, 2, "science")}
    assert got["ifeval"]["value"] == 0.75 and got["ifeval"]["stderr"] is None and got["ifeval"]["n"] == 100
    assert got["tqa"] == {
        "stage": 2,
        "stage_task": "science",
        "eval_task": "tqa",
        "kind": "prior",
        "metric": "acc,none",
        "value": 0.5,
        "n": None,
        "stderr": 0.02,
    }
    cfg.benchmarks["tqa"].metric = "acc_norm,none"
    with pytest.raises(DataError, match=r"benchmarks.tqa.metric: .*no 'acc_norm,none' .*it has: acc,none"):
        cells(cfg, results, 2, "science")


def test_check_knows_tasks_and_requires_the_opt_in_for_code(tmp_path):
    include = [str(local_tasks(tmp_path))]
    ok = PriorConfig(benchmarks={"arith": BenchmarkConfig(task="sdft_test_mc")}, include_path=include)
    assert "sdft_test_mc" in check(ok).task_index
    with pytest.raises(
        ConfigError, match=r"benchmarks.nope.task: lm-eval has no task, group or tag 'no_such_task'"
    ):
        check(PriorConfig(benchmarks={"nope": BenchmarkConfig(task="no_such_task")}))
    for task in ("sdft_test_unsafe", "humaneval"):
        unsafe = PriorConfig(benchmarks={"code": BenchmarkConfig(task=task)}, include_path=include)
        with pytest.raises(
            ConfigError, match=rf"{task} execute model-written code; set .*confirm_run_unsafe"
        ):
            check(unsafe)
        unsafe.confirm_run_unsafe_code = True
        assert check(unsafe) is not None
    with pytest.raises(ConfigError, match="eval.prior.include_path: no directory"):
        check(PriorConfig(benchmarks=ok.benchmarks, include_path=[str(tmp_path / "missing")]))


def test_lm_eval_score_lands_in_the_matrix_on_every_stage(tmp_path, tiny_model_dir):
    """The real integration, offline: a local lm-eval task on the tiny model, row 0 and after training."""
    from sdft_cli.models import resolve_model_dir

    tasks = local_tasks(tmp_path)
    run = tmp_path / "run"
    overrides = [*SMOKE, "task=[facts]", "model.precision=fp32", "eval.dtype=float32"]
    prior = [f"eval.prior.include_path=[{tasks}]", "+eval.prior.benchmarks.arith.task=sdft_test_mc"]
    sdft("run", *overrides, *prior, f"run_dir={run}", cwd=tmp_path)
    data = json.loads((run / "matrix.json").read_text())
    assert data["columns"] == ["facts", "capitals", "opposites", "languages", "arith"]
    col = data["columns"].index("arith")
    base_dir = resolve_model_dir(compose(overrides).model)
    expected = [brute_force_accuracy(base_dir), brute_force_accuracy(run / "t01_facts" / "train" / "model")]
    assert [row[col] for row in data["values"]] == pytest.approx(expected, abs=1e-9)
    for stage in ("t00_base", "t01_facts"):
        raw = json.loads((run / stage / "eval" / "lm_eval.json").read_text())
        assert raw["n-samples"]["sdft_test_mc"]["effective"] == 12
        (cell,) = [
            c
            for c in json.loads((run / stage / "eval" / "results.json").read_text())
            if c["kind"] == "prior" and c["eval_task"] == "arith"
        ]
        assert cell["metric"] == "acc,none" and cell["n"] == 12
    # prior avg counts the lm-eval column like the probes
    probes = [data["values"][0][data["columns"].index(p)] for p in ("capitals", "opposites", "languages")]
    assert data["metrics"]["prior_avg_base"] == pytest.approx((sum(probes) + expected[0]) / 4)
