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


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_experiment_settings(name):
    raw = compose_raw([f"experiment={name}"])
    assert raw.hydra.mode.name == "MULTIRUN"
    assert dict(raw.hydra.sweeper.params) == {"method": "sdft,sft", "seed": "0,1,2"}
    knowledge = name == "paper_knowledge"
    for method, lr, epochs in (("sdft", 5e-5, 4 if knowledge else 2), ("sft", 1e-5, 1)):
        cfg = compose([f"experiment={name}", f"method={method}"])
        assert list(cfg.task) == EXPERIMENTS[name]
        assert (cfg.model.path, cfg.model.dtype, cfg.model.precision) == (
            "Qwen/Qwen2.5-7B-Instruct",
            "bfloat16",
            "bf16",
        )
        m = cfg.method
        assert (m.name, m.optim.lr, m.epochs) == (method, lr, epochs)
        assert (m.prompts_per_step, m.optim.warmup_steps, m.optim.schedule) == (32, 10, "cosine")
        assert (m.optim.max_grad_norm, m.optim.weight_decay, m.gradient_checkpointing) == (1.0, 0.0, True)
        if method == "sdft":
            assert (m.ema_alpha, m.divergence, m.teacher, m.skip_first_tokens) == (0.01, "forward", "ema", 3)
        assert (cfg.rollout.temperature, cfg.rollout.top_p) == (1.0, 1.0)
        assert cfg.rollout.max_new_tokens == (1024 if knowledge else 2048)
        assert cfg.eval.probes == {} and cfg.eval.max_items is None
        prior = set(cfg.eval.prior.benchmarks)
        assert prior == (
            set() if knowledge else {"hellaswag", "humaneval", "ifeval", "mmlu", "truthfulqa", "winogrande"}
        )
        assert not cfg.eval.prior.confirm_run_unsafe_code


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
    args = ["experiment=paper_sequential", "method=sdft", *env_free, *medical]
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
