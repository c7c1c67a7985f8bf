"""Every config option composes and type-checks; wrong keys and values are one error naming the key."""

import pytest

from sdft_cli.compose import GROUPS, compose, conf_dir, run_subdir
from sdft_cli.config import SDFTConfig, SFTConfig
from sdft_cli.errors import ConfigError


@pytest.mark.parametrize("group", [g for g in GROUPS])
def test_every_option_of_every_group_composes(group):
    options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))
    assert options, group
    for opt in options:
        override = f"task=[{opt}]" if group == "task" else f"{group}={opt}"
        if group == "model" and opt == "hf":
            override = [override, "model.path=/some/local/dir"]
        cfg = compose(override if isinstance(override, list) else [override])
        assert cfg.run_dir and cfg.task


def test_method_option_selects_its_schema():
    assert isinstance(compose([]).method, SDFTConfig)
    assert isinstance(compose(["method=sft"]).method, SFTConfig)


def test_default_is_the_embedded_run():
    cfg = compose([])
    assert list(cfg.task) == ["facts", "toolcall", "mcq"] and cfg.method.teacher_init == "base"
    assert cfg.model.source == "smollm2" and cfg.method.divergence == "forward"
    assert cfg.method.teacher == "ema" and cfg.method.ema_alpha == 0.01
    # the paper masks the first 3 completion tokens; the default's one-line answers start their format
    # there, so the default does not (conf/experiment_method/default/sdft.yaml, docs/tasks.md)
    assert cfg.method.skip_first_tokens == 0 and compose(["experiment=none"]).method.skip_first_tokens == 3
    assert {t.teacher_template for t in cfg.task.values()} == {"example_turn", "again_turn"}
    assert set(cfg.eval.probes) == {"capitals", "opposites", "languages"}


def test_task_sequence_order_is_the_command_line_order():
    assert list(compose(["task=[facts,toolcall,mcq]"]).task) == ["facts", "toolcall", "mcq"]
    assert list(compose(["task=[mcq,facts]"]).task) == ["mcq", "facts"]
    assert list(compose(["task=facts"]).task) == ["facts"]


def test_run_dir_is_stable_and_follows_overrides():
    a = compose(["seed=1", "method=sft"]).run_dir
    assert a == compose(["method=sft", "seed=1"]).run_dir or a.endswith("method=sft,seed=1")
    assert compose([]).run_dir.endswith("default/default")
    assert compose(["logger=wandb"]).run_dir == compose([]).run_dir  # logging does not change results


def test_run_subdir_sanitises():
    assert run_subdir("") == "default"
    assert "/" not in run_subdir("model.path=/a/b")
    assert len(run_subdir("x=" + "y" * 300)) <= 120


@pytest.mark.parametrize(
    "override, message",
    [
        (
            ["task=nonexistent"],
            "unknown task 'nonexistent' (available: drop, facts, knowledge, mcq, medical, mirror, odd, "
            "science, shift, swap, toolcall, tooluse)",
        ),
        (["method=nope"], "unknown method 'nope'"),
        (["method.optim.lr=-1"], "method.optim.lr must be > 0"),
        (["method.divergence=kl"], "method.divergence='kl' is not one of forward, reverse, jsd"),
        (
            ["method.estimator=sampled"],
            "method.estimator=sampled estimates reverse KL; set divergence=reverse",
        ),
        (
            ["method.divergence=reverse", "method.estimator=sampled", "method.support=topk"],
            "method.estimator=sampled uses only the sampled token",
        ),
        (["method.jsd_beta=1.5"], "method.jsd_beta must be in [0, 1]"),
        (["method.topk=0"], "method.topk must be > 0"),
        (["method.is_cap=0.5"], "method.is_cap must be >= 1"),
        (["method=sft", "method.divergence=reverse"], "divergence"),
        (["method.loss_chunk_size=-1"], "method.loss_chunk_size must be >= 0"),
        (["method.importance_sampling=on", "rollout.temperature=0"], "needs sampled rollouts"),
        (["method.prompts_per_step=6", "method.micro_batch_size=4"], "must be a multiple of"),
        (["method.lr_typo=1"], "lr_typo"),
        (["seed=abc"], "seed"),
        (["task=[]"], "task sequence is empty"),
        (["task.facts.max_new_tokens=0"], "task.facts.max_new_tokens must be > 0"),
        (["task.facts.source=ftp"], "task.facts.source='ftp'"),
        (["model=hf"], "model.path must be set"),
        (["method=sft", "method.teacher=ema"], "teacher"),
        (["method.optim.max_grad_norm=0"], "method.optim.max_grad_norm must be > 0"),
        (["method.optim.betas=[0.9,1.5]"], "method.optim.betas must be two values in [0, 1)"),
        (["task.facts.scorer=bleu"], "task.facts.scorer='bleu' is not one of"),
        (["eval.probes.capitals.scorer=bleu"], "eval.probes.capitals.scorer='bleu'"),
        (["method.teacher_precision=fp16"], "method.teacher_precision='fp16'"),
        (["rollout.max_new_tokens=8", "rollout.min_new_tokens=9"], "rollout.min_new_tokens (9) exceeds"),
        (["dist.backend=mpi"], "dist.backend='mpi'"),
        (["dist.timeout_min=0"], "dist.timeout_min must be > 0"),
        (
            ["experiment=null"],
            "experiment=null: a config group takes an option name; for no experiment, use experiment=none",
        ),
        (["eval.prior=null"], "for no eval/prior, use eval/prior=none"),
        (["method.name=sft"], "method.name='sft' does not match the chosen method (sdft)"),
        (
            ["+task.facts.knowledge.questions_per_article=5"],
            "task.facts.knowledge applies to source=knowledge only",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        compose(override)
    text = str(e.value)
    assert message in text and "\n" not in text


def test_reference_config_is_current():
    """docs/reference_config.yaml is `sdft show` of the default (regenerate: make docs-config)."""
    from conftest import REPO
    from omegaconf import OmegaConf

    current = OmegaConf.to_yaml(OmegaConf.structured(compose([])))
    assert (REPO / "docs" / "reference_config.yaml").read_text() == current


def test_experiment_method_settings_come_from_their_folder():
    """experiment_method/<experiment>/<method>.yaml is merged into the method of that experiment only."""
    assert compose(["experiment=paper_science", "method=sdft"]).method.optim.lr == 5e-5
    assert compose(["experiment=paper_science", "method=sft"]).method.optim.lr == 1e-5
    assert compose(["experiment=none", "method=sdft"]).method.optim.lr == 1e-5  # the method's own


def test_only_knowledge_tasks_carry_the_generator_settings():
    cfg = compose(["task=[facts,knowledge]"])
    assert cfg.task["facts"].knowledge is None and cfg.eval.probes["capitals"].knowledge is None
    assert cfg.task["knowledge"].knowledge.generator.model == "gpt-5"
    from sdft_cli.config import TaskConfig

    plain = TaskConfig(source="knowledge", path="corpus")
    plain.check("task.k")  # no block of its own: the defaults, as recorded in config.yaml
    assert plain.knowledge is not None and plain.knowledge.questions_per_article == 100
