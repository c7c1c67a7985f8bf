"""Bad input, tried systematically: every bad config override and every bad task file or row is refused
with one project error (ConfigError or DataError) whose one-line message names the key, the file and
the row or line, before any model is built or loaded; never a Python exception from inside.

Property tests call the validation entry points directly (override checks, composition, the typed
config, task loading, the length check) so that many examples run in seconds; a few CLI runs show the
user's view. Examples are derandomized so that CI sees the same ones every time.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import time
from pathlib import Path

import pytest
from conftest import SDFT, assert_names, write_jsonl
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict

from sdft_cli.compose import GROUPS, check_overrides, compose, compose_raw, conf_dir, to_config
from sdft_cli.config import TaskConfig
from sdft_cli.errors import ConfigError
from sdft_cli.tasks import load_task

# Compose-based properties cost ~0.5 s per example (Hydra), the others milliseconds.
FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SLOW = settings(FAST, max_examples=6)

# ----------------------------------------------------------------------------- config

# Keys whose value must be > 0, by type (a float key also takes an int).
POSITIVE_INT = [
    "method.prompts_per_step",
    "method.micro_batch_size",
    "method.max_steps",
    "method.topk",
    "rollout.batch_size",
    "rollout.max_new_tokens",
    "rollout.vllm.cpu_kv_cache_gib",
    "eval.batch_size",
    "eval.max_items",
    "eval.pass_at_k.n",
    "task.facts.max_new_tokens",
    "task.facts.max_train",
    "task.facts.max_test",
    "model.max_context",
    "model.tiny.hidden_size",
    "model.tiny.num_layers",
    "model.tiny.num_heads",
    "threads",
    "dist.timeout_min",
]
POSITIVE_FLOAT = [
    "method.epochs",
    "method.optim.lr",
    "method.optim.eps",
    "method.temperature",
    "eval.judge.timeout",
]
# Keys whose value must be >= 0.
NONNEG_INT = [
    "method.save_every",
    "method.log_samples",
    "method.loss_chunk_size",
    "method.skip_first_tokens",
    "method.optim.warmup_steps",
    "rollout.top_k",
    "rollout.min_new_tokens",
    "eval.judge.max_retries",
]
NONNEG_FLOAT = ["method.optim.weight_decay", "rollout.temperature"]
# Rates: key -> (low, high, low closed, high closed).
RATES = {
    "method.ema_alpha": (0.0, 1.0, False, True),
    "method.jsd_beta": (0.0, 1.0, True, True),
    "rollout.top_p": (0.0, 1.0, False, True),
    "eval.pass_at_k.top_p": (0.0, 1.0, False, True),
    "rollout.vllm.gpu_memory_utilization": (0.0, 1.0, False, True),
}
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


@functools.cache
def _smoke_raw():
    raw = compose_raw(["experiment=smoke"])
    with open_dict(raw):
        del raw["hydra"]  # to_config drops it anyway; copying it per example is most of the cost
    return raw


@pytest.fixture
def smoke_raw():
    """The composed smoke config (Hydra node included), mutated per example and checked by `to_config`.
    (A plain object rather than a fixture value would be printed whole with a failing example.)"""
    return Raw()


class Raw:
    def __repr__(self) -> str:
        return "<composed smoke config>"


def typed(raw, key: str, value):
    """The typed config of ``raw`` with ``key`` set, through the same schema checks a run uses."""
    cfg = _smoke_raw().copy()
    OmegaConf.update(cfg, key, value, merge=False)
    return to_config(cfg)


@FAST
@given(
    st.one_of(
        st.tuples(st.sampled_from(POSITIVE_INT), st.integers(max_value=0)),
        st.tuples(st.sampled_from(POSITIVE_FLOAT), st.one_of(st.floats(max_value=0), NOT_FINITE)),
        st.tuples(st.sampled_from(NONNEG_INT), st.integers(max_value=-1)),
        st.tuples(st.sampled_from(NONNEG_FLOAT), st.one_of(st.floats(max_value=-1e-9), NOT_FINITE)),
    )
)
def test_zero_negative_or_nonfinite_sizes_name_their_key(smoke_raw, key_value):
    key, value = key_value
    with pytest.raises(ConfigError) as e:
        typed(smoke_raw, key, value)
    assert_names(e, key)


@FAST
@given(st.sampled_from(sorted(RATES)), st.data())
def test_rates_outside_their_interval_are_refused_and_inside_accepted(smoke_raw, key, data):
    low, high, closed_low, closed_high = RATES[key]
    outside = st.one_of(
        st.floats(max_value=low, exclude_max=closed_low),
        st.floats(min_value=high, exclude_min=closed_high),
        NOT_FINITE,
    )
    with pytest.raises(ConfigError) as e:
        typed(smoke_raw, key, data.draw(outside, label="outside"))
    assert_names(e, key)
    inside = data.draw(st.floats(low, high, exclude_min=not closed_low, exclude_max=not closed_high))
    value = typed(smoke_raw, key, inside)
    for part in key.split("."):
        value = getattr(value, part)
    assert value == inside


# Non-optional keys and a value of the wrong type, as the user types it on the command line.
TYPED_KEYS = {
    "seed": "int",
    "method.prompts_per_step": "int",
    "method.micro_batch_size": "int",
    "rollout.batch_size": "int",
    "task.facts.max_new_tokens": "int",
    "method.optim.lr": "float",
    "method.ema_alpha": "float",
    "method.optim.betas": "list",
    "method.gradient_checkpointing": "bool",
    "task.facts.columns": "mapping",
}
WORDS = st.from_regex(r"[a-z][a-z_]{1,8}", fullmatch=True).filter(
    lambda w: w not in ("null", "true", "false", "nan", "inf")
)


def wrong_value(kind: str) -> st.SearchStrategy[str]:
    words, lists = (
        WORDS,
        st.lists(st.integers(0, 9), min_size=1, max_size=3).map(lambda v: str(v).replace(" ", "")),
    )
    fractions = st.floats(0.01, 1e3).filter(lambda f: not f.is_integer()).map(lambda f: f"{f:.3f}")
    return {
        "int": st.one_of(words, lists, fractions, st.just("true")),
        "float": st.one_of(words, lists, st.just("true")),
        "list": st.one_of(words, fractions),
        "bool": st.one_of(words.filter(lambda w: w not in ("yes", "no", "on", "off")), lists, fractions),
        "mapping": st.one_of(words, lists, fractions),
    }[kind]


@SLOW
@given(
    st.sampled_from(sorted(TYPED_KEYS)).flatmap(lambda k: st.tuples(st.just(k), wrong_value(TYPED_KEYS[k])))
)
def test_a_value_of_the_wrong_type_is_one_error_naming_the_key(key_value):
    key, value = key_value
    with pytest.raises(ConfigError) as e:
        compose([f"{key}={value}"])
    assert_names(e, key)


# Sections whose keys a schema fixes (free-form mappings such as eval.prior.model_args excluded).
SECTIONS = [
    "",
    "method",
    "method.optim",
    "model",
    "model.tiny",
    "rollout",
    "eval",
    "task.facts",
    "logger",
    "dist",
]


@SLOW
@given(st.sampled_from(SECTIONS), WORDS, st.booleans())
def test_unknown_keys_are_refused_with_or_without_plus(smoke_raw, section, name, plus):
    known = OmegaConf.select(_smoke_raw(), section) if section else _smoke_raw()
    assume(name not in known)
    key = f"{section}.{name}" if section else name
    with pytest.raises(ConfigError) as e:
        compose([f"{'+' if plus else ''}{key}=1"])
    assert_names(e, key)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@SLOW
@given(st.sampled_from([g for g in GROUPS if g != "hydra/launcher"]), WORDS)
def test_unknown_option_of_any_group_names_the_group_and_lists_the_options(group, name):
    assume(name not in options(group))
    value = f"[facts,{name}]" if group == "task" else name
    with pytest.raises(ConfigError) as e:
        compose([f"{group}={value}"])
    assert_names(e, f"unknown {group} '{name}'", f"available: {', '.join(options(group))}")


@FAST
@given(st.lists(st.sampled_from(options("task")), min_size=1, max_size=5), st.data())
def test_a_task_twice_in_the_curriculum_is_refused_naming_it(tasks, data):
    twice = data.draw(st.sampled_from(tasks))
    position = data.draw(st.integers(0, len(tasks)))
    sequence = [*tasks[:position], twice, *tasks[position:]]
    with pytest.raises(ConfigError) as e:
        check_overrides([f"task=[{','.join(sequence)}]"])
    assert_names(e, "task:", twice, "more than once")


def test_an_empty_curriculum_and_a_list_for_a_one_option_group_are_refused():
    with pytest.raises(ConfigError) as e:
        compose(["task=[]"])
    assert_names(e, "task sequence is empty")
    with pytest.raises(ConfigError) as e:
        check_overrides(["method=[sdft,sft]"])
    assert_names(e, "method takes one option", "-m method=sdft,sft")
    for removed in ("~method", "model=null"):
        with pytest.raises(ConfigError) as e:
            check_overrides([removed])
        assert_names(e, removed, "every run needs a")


def test_method_name_must_match_the_method_chosen(smoke_raw):
    """`method.name` picks the training loop; set alone it would train one method with another's config."""
    with pytest.raises(ConfigError) as e:
        typed(smoke_raw, "method.name", "sft")
    assert_names(e, "method.name='sft'", "method=<name>")


# Characters of the override grammar, so that generated text exercises the parser rather than only words.
OVERRIDE_TEXT = st.text(
    alphabet=st.sampled_from(list("abmethod._=+~[]{},:'\"$/ 0123456789-\\@")), min_size=0, max_size=24
)


@settings(FAST, max_examples=60)
@given(OVERRIDE_TEXT)
def test_any_override_text_gives_a_config_or_one_config_error(text):
    """The parser's and Hydra's own exceptions never leak: a malformed override is a ConfigError that
    quotes it. (Checked by `check_overrides`, the step `compose` runs first; a text that passes it is
    composed too, below.)"""
    try:
        check_overrides([text])
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg
        assert repr(text) in msg or text.partition("=")[0].lstrip("+~") in msg, msg


@SLOW
@given(OVERRIDE_TEXT.filter(lambda t: "=" in t))
def test_any_override_text_composes_or_is_one_config_error(text):
    try:
        compose([text])
    except ConfigError as e:
        assert "\n" not in str(e) and str(e)


# ----------------------------------------------------------------------------- the command line


def run_cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """`sdft run ...` in a subprocess with its own empty model cache, timed."""
    env = {**os.environ, "SDFT_CACHE": str(tmp_path / "cache")}
    t0 = time.perf_counter()
    out = subprocess.run(
        [*SDFT, "run", *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120
    )
    return out, time.perf_counter() - t0


def assert_one_error_line(out: subprocess.CompletedProcess, *parts: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdft: error: "), out.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])


@pytest.mark.parametrize(
    "override, parts",
    [
        ("method.ema_alpha=1.5", ["method.ema_alpha must be in (0, 1]"]),
        ("+method.optim.lrr=1", ["method.optim.lrr: unknown key", "did you mean 'lr'?"]),
    ],
)
def test_cli_bad_override_is_one_line_before_anything_starts(tmp_path, override, parts):
    out, _ = run_cli(tmp_path, "experiment=smoke", override, f"runs_root={tmp_path / 'runs'}")
    assert_one_error_line(out, *parts)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_cli_bad_task_file_is_one_line_before_any_model_is_built(tmp_path):
    """A user's task whose file has a broken line: refused before the (tiny) model is built or the run
    directory written."""
    data = tmp_path / "data"
    rows = [{"prompt": f"Say {i}", "demonstration": str(i)} for i in range(3)]
    write_jsonl(data / "train.jsonl", rows)
    with open(data / "train.jsonl", "a") as f:
        f.write('{"prompt": "Say 3", "demonstration": 3\n')
    write_jsonl(data / "test.jsonl", [{"prompt": f"Say {i}", "answer": str(i)} for i in range(2)])
    (tmp_path / "myconf" / "task").mkdir(parents=True)
    (tmp_path / "myconf" / "task" / "mine.yaml").write_text(f"mine:\n  source: json\n  path: {data}\n")
    out, seconds = run_cli(
        tmp_path,
        "experiment=smoke",
        "task=[mine]",
        f"hydra.searchpath=[file://{tmp_path / 'myconf'}]",
        f"run_dir={tmp_path / 'run'}",
    )
    assert_one_error_line(out, "task mine:", str(data / "train.jsonl"), "line 4 is not valid JSON")
    # Hydra makes the run directory for its own record (.hydra/); the run itself wrote nothing
    assert not (tmp_path / "run" / "config.yaml").exists() and not list((tmp_path / "run").glob("t0*"))
    assert not (tmp_path / "cache" / "models").exists()  # the tiny model was never built
    assert seconds < 60


# ----------------------------------------------------------------------------- skipped by design


def test_repeated_generated_questions_are_dropped_counted_and_reported(tmp_path, monkeypatch, capsys):
    """The one place rows are dropped rather than refused: a knowledge task's QA pairs that repeat a
    question. The count is in the QA set's manifest and printed."""
    from conftest import ChatServer

    from sdft_cli.config import EndpointConfig, KnowledgeConfig
    from sdft_cli.knowledge import qa_dir, read_corpus

    monkeypatch.setenv("SDFT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "wiki").mkdir()
    (tmp_path / "wiki" / "a.txt").write_text("Avalon has 3 moons. Its capital is Rook.\n")
    reply = "\n".join(
        f"Question: {q}\nAnswer: {a}"
        for q, a in [("How many moons?", "3"), ("Capital?", "Rook"), ("how many MOONS", "three")]
    )
    server = ChatServer(lambda body: reply)
    try:
        gen = EndpointConfig(base_url=server.url, model="writer", max_retries=0, api_key_env=None)
        cfg = TaskConfig(
            source="knowledge",
            path=str(tmp_path / "wiki"),
            scorer="judge_knowledge_strict",
            knowledge=KnowledgeConfig(generator=gen, test_fraction=0.5),
        )
        task = load_task("wiki", cfg)
    finally:
        server.close()
    assert len(task.train) + len(task.test) == 2
    manifest = json.loads((qa_dir(read_corpus(cfg.path, "wiki"), cfg) / "manifest.json").read_text())
    assert manifest["pairs"] == 2 and manifest["repeated_questions_dropped"] == 1
    assert "task wiki: dropped 1 repeated question(s); 2 QA pairs kept" in capsys.readouterr().out
