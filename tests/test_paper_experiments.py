"""The paper's experiment configs: the settings they compose to, and a plan over data in the paper's
formats (fixture copies laid out as the official release)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import REPO, sdft

from sdft_cli.compose import compose, compose_raw

FIXTURES = REPO / "tests" / "fixtures"
EXPERIMENTS = {
    "paper_tooluse": ["tooluse"],
    "paper_science": ["science"],
    "paper_medical": ["medical"],
    "paper_knowledge": ["knowledge"],
    "paper_sequential": ["tooluse", "science", "medical"],
}


# Table 5's trained rows for the skill experiments; Table 1's for knowledge; Fig. 3's panels
SWEPT = {
    "paper_tooluse": "sdft,sft,dft,sft_reinvoke",
    "paper_science": "sdft,sft,dft,sft_reinvoke",
    "paper_medical": "sdft,sft,dft,sft_reinvoke",
    "paper_knowledge": "sdft,sft",
    "paper_sequential": "sdft,sft",
}
ALL_METHODS = ("sdft", "sft", "dft", "sft_reinvoke", "offline_distill", "sft_teacher")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_experiment_settings(name):
    raw = compose_raw([f"experiment={name}"])
    assert raw.hydra.mode.name == "MULTIRUN"
    assert dict(raw.hydra.sweeper.params) == {"method": SWEPT[name], "seed": "0,1,2"}
    knowledge = name == "paper_knowledge"
    expected = {
        "sdft": (5e-5, 4 if knowledge else 2, "seq_mean"),
        "sft": (1e-5, 1, "token_mean"),
        "dft": (1e-5, 1, "token_mean"),
        "sft_reinvoke": (1e-5, 1, "token_mean"),
        "offline_distill": (5e-5, 4 if knowledge else 2, "seq_mean"),
        "sft_teacher": (1e-5, 1, "token_mean"),
    }
    for method in ALL_METHODS:
        # every method has the experiment's own settings file, with its sources
        assert (REPO / "conf" / "experiment_method" / name / f"{method}.yaml").is_file(), method
        cfg = compose([f"experiment={name}", f"method={method}"])
        assert list(cfg.task) == EXPERIMENTS[name]
        assert (cfg.model.path, cfg.model.dtype, cfg.model.precision) == (
            "Qwen/Qwen2.5-7B-Instruct",
            "bfloat16",
            "bf16",
        )
        m = cfg.method
        assert (m.name, m.optim.lr, m.epochs, m.aggregation) == (method, *expected[method])
        assert (m.prompts_per_step, m.optim.warmup_steps, m.optim.schedule) == (32, 10, "cosine")
        assert (m.optim.max_grad_norm, m.optim.weight_decay, m.gradient_checkpointing) == (1.0, 0.0, True)
        if method == "sdft":
            assert (m.ema_alpha, m.divergence, m.teacher, m.skip_first_tokens) == (0.01, "forward", "ema", 3)
            assert m.rollouts_per_prompt == 1 and m.max_prompt_tokens is None
        if method == "offline_distill":
            assert (m.teacher, m.teacher_samples, m.generate_from) == ("frozen", "fixed", "teacher")
        # chosen on validation, scored every 25 steps; every task has a validation share of its train rows
        assert (cfg.select, cfg.eval.every_steps, cfg.eval.periodic) == ("best_val", 25, ["val"])
        assert all(t.val_fraction > 0 for t in cfg.task.values())
        assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 1.0)
        assert cfg.rollout.max_new_tokens == (1024 if knowledge else 2048)
        assert cfg.eval.probes == {} and cfg.eval.max_items is None
        prior = set(cfg.eval.prior.benchmarks)
        assert prior == (
            set() if knowledge else {"hellaswag", "humaneval", "ifeval", "mmlu", "truthfulqa", "winogrande"}
        )
        assert not cfg.eval.prior.confirm_run_unsafe_code


def test_the_figure_experiments_carry_their_sources_settings():
    """Fig. 3 with the authors' settings (issue #9), Fig. 6's on-policy vs offline use of the teacher,
    Fig. 8's teacher ablation."""
    fig3 = compose(["experiment=paper_fig3", "method=sdft"])
    m = fig3.method
    assert list(fig3.task) == ["tooluse", "science", "medical"]
    assert (m.optim.lr, m.optim.warmup_steps, m.optim.schedule, m.prompts_per_step, m.epochs) == (
        1e-5,
        10,
        "cosine",
        32,
        2,
    )
    assert (m.divergence, m.is_cap, m.skip_first_tokens, m.teacher, m.rollouts_per_prompt) == (
        "forward",
        2.0,
        3,
        "frozen",
        1,
    )
    assert (fig3.select, fig3.eval.every_steps, fig3.eval.periodic) == ("last", 10, ["val", "test"])
    assert dict(compose_raw(["experiment=paper_fig3"]).hydra.sweeper.params)["method"] == "sdft,sft"
    fig6 = {
        m: compose(["experiment=paper_fig6", f"method={m}"])
        for m in ("sdft", "offline_distill", "sft_teacher")
    }
    assert all(c.method.epochs == 1 and c.task["tooluse"].max_train == 2048 for c in fig6.values())
    assert fig6["offline_distill"].method.teacher_samples == "fixed"
    assert fig6["sft_teacher"].method.targets == "teacher"
    params = dict(compose_raw(["experiment=paper_fig8"]).hydra.sweeper.params)
    assert params["method.teacher"] == "ema,frozen,live" and params["method"] == "sdft"


def test_validate_composes_every_paper_experiment_with_every_method(tmp_path):
    out = sdft("validate", cwd=tmp_path).stdout
    assert "all configs compose and type-check" in out and "FAIL" not in out
    assert "ok    'task=[facts]'" in out and "ok    method=sft_teacher" in out  # every group's options too
    for name in [*EXPERIMENTS, "paper_fig3", "paper_fig6", "paper_fig8"]:
        for method in ALL_METHODS:
            line = f"ok    experiment={name} method={method}\n"
            assert line in out, (name, method)


def test_paper_task_settings():
    cfg = compose(["experiment=paper_sequential", "method=sdft"])
    tool, sci, med = cfg.task["tooluse"], cfg.task["science"], cfg.task["medical"]
    assert (tool.format, tool.scorer, tool.max_new_tokens, tool.source) == (
        "toolalpaca",
        "tool_call",
        1024,
        "disk",
    )
    assert (sci.format, sci.scorer, sci.max_new_tokens) == ("sciknoweval", "answer_tag", 2048)
    assert (med.format, med.scorer, med.max_test, med.subset) == ("huatuo", "judge_medical", 1000, "en")
    assert all(t.teacher_template == "paper" for t in (tool, sci, med))
    know = compose(["experiment=paper_knowledge", "method=sdft"]).task["knowledge"]
    assert (know.scorer, know.teacher_template, know.knowledge.generator.model) == (
        "judge_knowledge_strict",
        "knowledge",
        "gpt-5",
    )


def test_plan_of_the_sequential_experiment_on_release_shaped_data(tmp_path):
    import datasets

    data = tmp_path / "data"
    for task, fixture in (("tooluse_data", "toolalpaca"), ("science_data", "sciknoweval")):
        for split, name in (("train", "train_data"), ("test", "eval_data")):
            rows = [json.loads(x) for x in (FIXTURES / fixture / f"{split}.jsonl").read_text().splitlines()]
            datasets.Dataset.from_list(rows).save_to_disk(str(data / task / name))
    huatuo = FIXTURES / "huatuo"
    medical = [
        "task.medical.source=json",
        f"task.medical.path={huatuo / 'reasoning_sft'}",
        f"task.medical.test_path={huatuo / 'verifiable'}",
    ]
    env_free = [f"task.tooluse.path={data / 'tooluse_data'}", f"task.science.path={data / 'science_data'}"]
    # the fixtures' two rows per split leave no validation share: plan them without one
    no_val = [
        "select=last",
        "eval.every_steps=0",
        *(f"task.{t}.val_fraction=0" for t in EXPERIMENTS["paper_sequential"]),
    ]
    args = ["experiment=paper_sequential", "method=sdft", *env_free, *medical, *no_val]
    out = sdft("plan", *args, "--params", "7.6e9", "--json", cwd=tmp_path)
    plan = json.loads(out.stdout)
    sizes = {
        t: len((FIXTURES / f / "train.jsonl").read_text().splitlines())
        for t, f in (("tooluse", "toolalpaca"), ("science", "sciknoweval"))
    }
    sizes["medical"] = len((huatuo / "reasoning_sft" / "train.jsonl").read_text().splitlines())
    rows = {t["name"]: t for t in plan["tasks"]}
    assert list(rows) == ["tooluse", "science", "medical"]
    for name, n in sizes.items():
        assert rows[name]["n_train"] == n
        assert rows[name]["steps"] == math.ceil(2 * n / 32)  # 2 epochs of 32 prompts
        assert rows[name]["completions"] == rows[name]["steps"] * 32
        assert rows[name]["train_tokens"] == 2048
    assert plan["eval_stages"] == 4 and plan["lm_eval"]["runs"] == 4 and plan["flops"] > 0
    text = sdft("plan", *args, "--params", "7.6e9", cwd=tmp_path).stdout
    assert "tooluse" in text and "GPU-hours" in text and "lm-eval suite (hf, all documents)" in text
