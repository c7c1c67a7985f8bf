"""Which directory a model config means, and one line for a ``model.path`` that cannot be one."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from sdft_cli.cli import app
from sdft_cli.errors import ConfigError
from sdft_cli.models import check_model_path, is_local, load_tokenizer


def test_hub_ids_and_local_paths_are_told_apart(tmp_path):
    assert not is_local("Qwen/Qwen2.5-7B-Instruct") and not is_local("gpt2")
    for path in ("/models/qwen", "./qwen", "../qwen", "~/qwen", "models/org/qwen", str(tmp_path)):
        assert is_local(path), path
    assert check_model_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"


def test_a_model_directory_passes_and_each_missing_part_is_named(tiny_model_dir, tmp_path):
    assert check_model_path(str(tiny_model_dir)) == tiny_model_dir
    cases = {
        "missing": ("no such directory", None),
        "file": ("not a directory", "file"),
        "empty": ("not a model directory (no config.json)", "empty"),
        "no_weights": ("no safetensors weights", "model.safetensors"),
        "no_tokenizer": ("no tokenizer", "tokenizer"),
    }
    for name, (message, drop) in cases.items():
        path = tmp_path / name
        if name == "file":
            path.write_text("x")
        elif name == "empty":
            path.mkdir()
        elif name != "missing":
            shutil.copytree(tiny_model_dir, path)
            for f in path.iterdir():
                if (drop == "tokenizer" and f.name.startswith(("tokenizer", "vocab", "special"))) or (
                    f.name == drop
                ):
                    f.unlink()
        with pytest.raises(ConfigError) as e:
            check_model_path(str(path))
        assert str(e.value).startswith(f"model.path={path}: {message}"), e.value
        assert "\n" not in str(e.value)


def test_an_uncached_hub_id_offline_is_one_line(offline_env):
    with pytest.raises(ConfigError, match=r"^model.path=nobody/no-such-model: cannot load it from the hub"):
        load_tokenizer("nobody/no-such-model")


@pytest.mark.parametrize(
    ("path", "message"),
    [("/models/Qwen2.5-7B-Instruct", "no such directory"), ("{empty}", "not a model directory")],
)
def test_sdft_run_with_a_bad_model_path_stops_with_one_line(path, message, tmp_path, offline_env):
    """The README's example with a path that is not there: exit 2 and one line, before any work."""
    (tmp_path / "empty").mkdir()
    path = path.format(empty=tmp_path / "empty")
    args = ["run", "model=hf", f"model.path={path}", "model.name=qwen7b", "experiment=none"]
    out = CliRunner().invoke(app, [*args, f"runs_root={tmp_path}"])
    assert out.exit_code == 2
    lines = [ln for ln in out.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"sdft: error: model.path={path}: {message}"), lines
    assert not any(tmp_path.glob("*/*/config.yaml"))  # nothing was written
