"""The package's structure: no import cycle between its modules, small modules, and every table of
names (``sdft_cli.names``) matched by the implementations keyed by it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from sdft_cli import formats, judge, names, scorers
from sdft_cli.methods import METHODS

PACKAGE = Path(__file__).resolve().parents[1] / "sdft_cli"
# The layers, bottom up: a module may import from its own layer and the ones below, never above.
BOTTOM = {"sdft_cli.errors", "sdft_cli.names"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = f
    return out


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Every module's imports of the package's modules, lazy ones (inside functions) included; those
    under ``if TYPE_CHECKING:`` are annotations, not imports."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        is_pkg = f.name == "__init__.py"
        tree = ast.parse(f.read_text())
        typing_only = {
            id(x)
            for n in ast.walk(tree)
            if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
            for b in n.body
            for x in ast.walk(b)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = m.split(".") if is_pkg else m.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, base] if base else parts)
                targets = [base, *(f"{base}.{a.name}" for a in node.names)]
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                # a package's own modules reading their __init__ is how packages work, not a cycle
                if t and t != m and not (mods[t].name == "__init__.py" and m.startswith(t + ".")):
                    edges[m].add(t)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_modules():
    assert _cycles(_imports(_modules())) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_names_and_config_sit_at_the_bottom():
    """names imports only errors; the config schemas import only errors, names and each other."""
    edges = _imports(_modules())
    assert edges["sdft_cli.names"] <= {"sdft_cli.errors"}
    for m, deps in edges.items():
        if m == "sdft_cli.config" or m.startswith("sdft_cli.config."):
            outside = {d for d in deps if not d.startswith("sdft_cli.config")} - BOTTOM
            assert not outside, f"{m} imports {sorted(outside)}"


def test_no_module_is_over_400_lines():
    long = {m: n for m, f in _modules().items() if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_every_scorer_format_and_method_name_has_its_implementation():
    assert set(scorers.SCORERS) == set(names.SCORERS)
    assert set(formats.FORMATS) == set(names.ROW_FORMATS) - {"columns"}
    assert set(METHODS) == set(names.METHODS)
    for prompt, mapping in names.JUDGE_SCORERS.values():
        assert prompt in judge.PROMPTS and mapping in judge.CREDIT


@pytest.mark.parametrize("name", names.METHODS)
def test_a_method_is_one_entry_schema_train_and_config_file(name):
    from sdft_cli.compose import compose, conf_dir

    method = METHODS[name]
    assert method.schema.name == name
    assert (conf_dir() / method.config_file).is_file()
    assert type(compose([f"method={name}"]).method) is method.schema
