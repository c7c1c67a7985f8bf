"""Security defaults: model code runs only when trusted, code-executing benchmarks only with an opt-in,
no unpickling of arbitrary objects, and API keys never reach the run directory, Hydra's record or W&B."""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SMOKE, ChatServer, sdft, write_jsonl

from sdft_cli import pipeline
from sdft_cli.compose import compose
from sdft_cli.config import BenchmarkConfig, OptimConfig, PriorConfig
from sdft_cli.engines.vllm import runs_remote_code
from sdft_cli.errors import ConfigError
from sdft_cli.logger import REDACTED, redact_argv
from sdft_cli.models import load_config, load_model, load_tokenizer
from sdft_cli.prior import check

MARKER_CODE = """from pathlib import Path

Path({marker!r}).write_text("the model's own code ran")

from transformers import LlamaConfig, LlamaForCausalLM


class MarkerConfig(LlamaConfig):
    model_type = "sdft_marker"


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
"""


def custom_code_model(tiny_model_dir: Path, out: Path, marker: Path) -> Path:
    """The tiny model whose config.json names Python code in the directory (auto_map), as hub models with
    custom architectures do; importing that code writes ``marker``."""
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config.update(
        model_type="sdft_marker",
        architectures=["MarkerForCausalLM"],
        auto_map={"AutoConfig": "marker.MarkerConfig", "AutoModelForCausalLM": "marker.MarkerForCausalLM"},
    )
    (out / "config.json").write_text(json.dumps(config))
    (out / "marker.py").write_text(MARKER_CODE.format(marker=str(marker)))
    return out


# ----------------------------------------------------------------------------- trust_remote_code


def test_model_code_is_refused_by_default_and_runs_only_when_trusted(tmp_path, tiny_model_dir, monkeypatch):
    marker = tmp_path / "marker.txt"
    model_dir = custom_code_model(tiny_model_dir, tmp_path / "custom", marker)
    assert compose([]).model.trust_remote_code is False
    for load in (load_config, load_model):
        with pytest.raises(ConfigError, match=r"set model.trust_remote_code=true"):
            load(model_dir)
    load_tokenizer(model_dir)  # a standard tokenizer loads; it runs nothing
    assert not marker.exists()
    assert not runs_remote_code(load_model(tiny_model_dir))

    # a whole run on that directory: one error naming the key, before any work, and the code never ran
    model = ["model=hf", f"model.path={model_dir}", "model.name=custom"]
    with pytest.raises(ConfigError, match=r"set model.trust_remote_code=true"):
        pipeline.run(compose([*SMOKE, *model, "task=[facts]", f"run_dir={tmp_path / 'r'}"]))
    assert not marker.exists() and not (tmp_path / "r" / "t00_base").exists()

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    # trusted: the model's own class is built (the code ran), and an engine serving it may run it too
    script = (
        "import sys\nfrom sdft_cli.models import load_model\n"
        "from sdft_cli.engines.vllm import runs_remote_code\n"
        "m = load_model(sys.argv[1], trust_remote_code=True); print(type(m).__name__, runs_remote_code(m))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(model_dir)], capture_output=True, text=True, env=os.environ
    )
    assert done.stdout.split() == ["MarkerForCausalLM", "True"], done.stderr
    assert marker.read_text() == "the model's own code ran"


@pytest.mark.slow
def test_a_whole_run_on_a_trusted_custom_code_model(tmp_path, tiny_model_dir, monkeypatch):
    marker = tmp_path / "marker.txt"
    model_dir = custom_code_model(tiny_model_dir, tmp_path / "custom", marker)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    model = ["model=hf", f"model.path={model_dir}", "model.name=custom", "model.trust_remote_code=true"]
    sdft(
        "run", *SMOKE, *model, "task=[facts]", "method.max_steps=1", f"run_dir={tmp_path / 'r'}", cwd=tmp_path
    )
    assert marker.is_file()
    assert json.loads((tmp_path / "r" / "matrix.json").read_text())["rows"] == ["base", "1:facts"]


def test_lm_eval_model_args_cannot_trust_code_behind_the_model_key():
    cfg = PriorConfig(
        benchmarks={"a": BenchmarkConfig(task="arc_easy")}, model_args={"trust_remote_code": True}
    )
    with pytest.raises(ConfigError, match=r"eval.prior.model_args.trust_remote_code: set model.trust_remote"):
        check(cfg)


# ----------------------------------------------------------------------------- code-executing benchmarks


@pytest.mark.slow  # lm-eval's task index takes ~10 s of CPU; prior.check's own test runs in CI
def test_code_executing_benchmark_needs_the_opt_in_before_any_model_load(tmp_path):
    """The paper's suite (HumanEval) without the opt-in: one error naming the key, raised before the model
    is touched (its path does not even exist)."""
    missing = tmp_path / "no-model-here"
    args = ["model=hf", f"model.path={missing}", "model.name=x", "task=[facts]", "eval/prior=paper"]
    with pytest.raises(ConfigError) as err:
        pipeline.run(compose([*SMOKE, *args, f"run_dir={tmp_path / 'r'}"]))
    assert "humaneval" in str(err.value) and "eval.prior.confirm_run_unsafe_code=true" in str(err.value)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------- deserialisation

# module -> attribute calls that unpickle (or run) whatever a file holds
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str) -> list[tuple[int, str]]:
    """(line, what) for every call that deserialises arbitrary objects or runs code from data."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, f"import {n}") for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("eval", "exec"):
            found.append((node.lineno, f"{func.id}()"))
        if _true(_kw(node, "trust_remote_code")):
            found.append((node.lineno, "trust_remote_code=True"))
        if not isinstance(func, ast.Attribute) or not isinstance(func.value, ast.Name):
            continue
        mod, attr = func.value.id, func.attr
        if mod == "torch" and attr == "load" and not _true(_kw(node, "weights_only")):
            found.append((node.lineno, "torch.load without weights_only=True"))
        if mod == "yaml" and attr in ("unsafe_load", "full_load", "load_all", "unsafe_load_all"):
            found.append((node.lineno, f"yaml.{attr}"))
        if mod == "yaml" and attr == "load" and "SafeLoader" not in ast.unparse(_kw(node, "Loader") or node):
            found.append((node.lineno, "yaml.load without SafeLoader"))
        if mod in ("np", "numpy") and attr == "load" and _true(_kw(node, "allow_pickle")):
            found.append((node.lineno, "np.load(allow_pickle=True)"))
        if mod in ("pd", "pandas") and attr == "read_pickle":
            found.append((node.lineno, "pandas.read_pickle"))
    return found


def implicit_trust(source: str) -> list[tuple[int, str]]:
    """(line, what) for every ``Auto*.from_pretrained`` that leaves ``trust_remote_code`` unset: transformers
    then asks on an interactive terminal whether to run the model's code, past the config key."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        if (
            isinstance(owner, ast.Name)
            and owner.id.startswith("Auto")
            and node.func.attr == "from_pretrained"
            and _kw(node, "trust_remote_code") is None
        ):
            found.append((node.lineno, f"{owner.id}.from_pretrained without trust_remote_code"))
    return found


def test_the_scanner_finds_every_unsafe_pattern():
    bad = (
        "import pickle\nfrom joblib import load\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
        "yaml.load(s)\nyaml.unsafe_load(s)\nnp.load(p, allow_pickle=True)\neval(s)\nexec(s)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=True)\npd.read_pickle(p)\n"
    )
    assert [line for line, _ in unsafe_calls(bad)] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    good = (
        "torch.load(p, weights_only=True)\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\n"
        "np.load(p)\nmodel.eval()\nAutoModel.from_pretrained(p, trust_remote_code=cfg.trust)\n"
    )
    assert unsafe_calls(good) == []
    assert [line for line, _ in implicit_trust(bad + "AutoConfig.from_pretrained(p)\n")] == [12]
    assert implicit_trust(good) == []


def scan(check) -> list[str]:
    files = sorted([*(REPO / "sdft_cli").rglob("*.py"), *(REPO / "scripts").rglob("*.py")])
    assert len(files) > 20
    return [f"{f.relative_to(REPO)}:{line}: {what}" for f in files for line, what in check(f.read_text())]


def test_the_package_never_unpickles_or_trusts_code_by_itself():
    hits = scan(unsafe_calls)
    assert hits == [], "unsafe deserialisation or code execution:\n" + "\n".join(hits)


def test_every_transformers_load_decides_trust_remote_code():
    hits = scan(implicit_trust)
    assert hits == [], "trust_remote_code left to an interactive prompt:\n" + "\n".join(hits)


# ----------------------------------------------------------------------------- API keys


def test_a_literal_key_where_a_variable_name_belongs_is_refused():
    with pytest.raises(ConfigError, match=r"eval.judge.api_key_env must name an environment variable"):
        compose(["eval.judge.api_key_env=sk-proj-abc123"])
    with pytest.raises(ConfigError, match=r"eval.judge.api_key_env must name"):
        compose(["eval.judge.api_key_env=hf_abcdefghijklmnop"])
    with pytest.raises(ConfigError, match=r"eval.prior.model_args.api_key: a credential in the config"):
        compose(["+eval.prior.model_args.api_key=abc123"])
    assert compose(["eval.judge.api_key_env=MY_JUDGE_KEY"]).eval.judge.api_key_env == "MY_JUDGE_KEY"
    assert compose(["eval.judge.max_tokens=16"]).eval.judge.max_tokens == 16  # *_tokens is no credential


def test_a_literal_key_on_the_command_line_is_refused_before_anything_is_written(tmp_path):
    key = "sk-" + secrets.token_hex(16)
    args = [f"eval.judge.api_key_env={key}", f"run_dir={tmp_path / 'r'}"]
    out = sdft("run", *SMOKE, *args, cwd=tmp_path, check=False)
    assert out.returncode == 2 and "eval.judge.api_key_env must name" in out.stderr
    assert key not in out.stderr and not (tmp_path / "r").exists()


def test_recorded_command_lines_have_credentials_redacted():
    env = {"OPENAI_API_KEY": "sk-live-1234567", "PATH": "/usr/bin", "HF_TOKEN": "hf_abcdef"}
    argv = [
        "sdft",
        "run",
        "hydra.job.env_set.WANDB_API_KEY=abc",
        "seed=1",
        "x=sk-live-1234567/y",
        "+a.token=t",
    ]
    assert redact_argv(argv, env) == [
        "sdft",
        "run",
        f"hydra.job.env_set.WANDB_API_KEY={REDACTED}",
        "seed=1",
        f"x={REDACTED}/y",
        f"+a.token={REDACTED}",
    ]
    assert redact_argv(["/usr/bin/sdft", "max_tokens=5"], env) == ["/usr/bin/sdft", "max_tokens=5"]


def files_containing(root: Path, needles: dict[str, bytes]) -> list[str]:
    """Every (file, needle name) under ``root`` whose bytes contain the needle (binary files included)."""
    hits = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {name}" for name, value in needles.items() if value in data]
    return hits


def test_api_keys_never_reach_the_run_directory_hydra_or_wandb(tmp_path, monkeypatch):
    """A real run with W&B (offline) and an LLM-judged probe, the judge's key and W&B's and the hub's
    tokens in the environment: the judge receives its key, and no file written anywhere holds one."""
    keys = {
        "OPENAI_API_KEY": "sk-test-" + secrets.token_hex(16),
        "WANDB_API_KEY": secrets.token_hex(20),
        "HF_TOKEN": "hf_" + secrets.token_hex(16),
    }
    for name, value in keys.items():
        monkeypatch.setenv(name, value)
    server = ChatServer(lambda body: "CORRECT")
    rows = [{"prompt": f"Say {w}", "demonstration": w, "answer": w} for w in ("red", "blue")]
    data = tmp_path / "judged"
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "test.jsonl", rows)
    (tmp_path / "conf" / "task").mkdir(parents=True)
    (tmp_path / "conf" / "task" / "judged.yaml").write_text(
        f"judged:\n  source: json\n  path: {data}\n  scorer: judge_medical\n  max_new_tokens: 4\n"
    )
    canary = "canary" + secrets.token_hex(4)
    run, cache = tmp_path / "r", tmp_path / "verdicts.sqlite"
    try:
        sdft(
            "run",
            *SMOKE,
            f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
            "task=[judged]",
            "method.max_steps=1",
            "method.prompts_per_step=2",
            "eval.probes={}",
            f"eval.judge.base_url={server.url}",
            "eval.judge.model=judge",
            f"eval.judge.cache={cache}",
            "logger=wandb",
            f"logger.tags=[{canary}]",
            f"run_dir={run}",
            cwd=tmp_path,
        )
    finally:
        server.close()
    assert server.headers and all(
        h["authorization"] == f"Bearer {keys['OPENAI_API_KEY']}" for h in server.headers
    )
    assert (run / ".hydra" / "config.yaml").is_file() and list((run / "wandb").glob("offline-run-*/*.wandb"))
    # the scan sees inside every file, W&B's binary log included: the config's canary is found there
    seen = files_containing(run, {"canary": canary.encode()})
    assert {"config.yaml: canary", ".hydra/config.yaml: canary"} <= set(seen)
    assert any(s.endswith(".wandb: canary") for s in seen), seen
    needles = {name: value.encode() for name, value in keys.items()}
    assert files_containing(run, needles) == []
    assert files_containing(tmp_path, needles) == []  # the judge's cache and anything else written


def test_a_trusted_custom_code_model_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, monkeypatch):
    from sdft_cli.checkpoint import load_checkpoint, save_checkpoint
    from sdft_cli.schedule import TrainState, build_optimizer
    from sdft_cli.teacher import Teacher

    marker = tmp_path / "marker.txt"
    model_dir = custom_code_model(tiny_model_dir, tmp_path / "custom", marker)
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    student = load_model(model_dir, trust_remote_code=True)
    opt, sched = build_optimizer(student, OptimConfig(), 4)
    teacher = Teacher("ema", student, 0.1)
    tok = load_tokenizer(model_dir)
    ckpt = save_checkpoint(
        tmp_path / "step_000001", student, tok, teacher=teacher, opt=opt, sched=sched, state=TrainState(1, 4)
    )
    with pytest.raises(ConfigError, match=r"set model.trust_remote_code=true"):
        load_checkpoint(ckpt, student, teacher, opt, sched)  # the default refuses the saved model's code
    assert load_checkpoint(ckpt, student, teacher, opt, sched, trust_remote_code=True).step == 1
    teacher.load_weights(ckpt / "model", trust_remote_code=True)
