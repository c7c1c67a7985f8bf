"""Every command line of the README's examples block composes as written (a broken example fails here),
and the README's package tree lists every module."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sdft_cli.cli import app, preflight, split_args
from sdft_cli.compose import GROUPS, compose

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> list[str]:
    """The lines of the first fenced block after ``heading``."""
    text = README.read_text()
    after = text[text.index(heading) :]
    body = re.search(r"```[a-z]*\n(.*?)```", after, re.S)
    assert body, f"no code block after {heading!r}"
    return [line for line in body.group(1).splitlines() if line.strip()]


EXAMPLES = [shlex.split(line, comments=True) for line in _block("## Examples")]


def _sdft_args(words: list[str]) -> list[str]:
    """The arguments after ``sdft`` (or after ``-m sdft_cli`` for a launcher such as torchrun)."""
    if words[0] == "sdft":
        return words[1:]
    i = words.index("sdft_cli")  # torchrun ... -m sdft_cli run ...
    return words[i + 1 :]


@pytest.mark.parametrize("words", EXAMPLES, ids=[" ".join(w) for w in EXAMPLES])
def test_example_composes_as_written(words, offline_env):
    command, *args = _sdft_args(words)
    if command == "run":
        overrides, _ = split_args(args)
        preflight(overrides)  # what `sdft run` checks before launching: every sweep value composes
    elif command == "show":
        compose(args)
    elif command == "ls":
        assert not args or args[0] in GROUPS
    elif command in (
        "matrix",
        "compare",
        "report",
    ):  # they read a run's files: the command and its argument exist
        assert len(args) == 1
        out = CliRunner().invoke(app, [command, "--help"])
        assert out.exit_code == 0, out.output
    elif command == "plan":
        out = CliRunner().invoke(app, ["plan", *args])
        assert out.exit_code == 0, out.output
        assert "steps" in out.output
    elif command == "validate":
        assert not args  # composes every option: tests/test_paper_experiments.py runs it
    else:
        pytest.fail(f"README example with an unknown command: {' '.join(words)}")


def test_the_examples_cover_every_command():
    used = {_sdft_args(w)[0] for w in EXAMPLES}
    commands = {c.name or c.callback.__name__.rstrip("_") for c in app.registered_commands}
    assert commands <= used, commands - used


def test_the_package_tree_lists_every_module():
    """The README's tree has one line per module (``path  # what it holds``), none that does not exist;
    a package's ``__init__.py`` is listed when it holds code."""
    package = README.parent / "sdft_cli"
    listed = [line.split()[0] for line in _block("## The package")[1:]]
    modules = {
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if p.name != "__init__.py" or len(p.read_text().splitlines()) > 5
    }
    assert sorted(set(listed) - modules) == [], "listed but not a module"
    assert sorted(modules - set(listed)) == [], "a module the tree does not list"
    assert len(listed) == len(set(listed))
