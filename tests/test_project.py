"""The project's shape: imports flow one way, modules stay small and say what they are for, every
document the code points to is in the repository, and no text speaks of how the code was made.

The import graph is read from the source (imports inside functions included), so an import cycle hidden
in a function body is found as well as one at the top of a module.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("esgd", "bench", "tasks")
SOURCES = sorted(p for pkg in PACKAGES for p in (ROOT / pkg).glob("*.py")) + [ROOT / "cli.py"]
DOCS = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TESTS = sorted((ROOT / "tests").rglob("*.py"))


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in SOURCES}


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or the package holding an attribute)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _origin(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    here = module_name(path)
    package = (here if path.name == "__init__.py" else here.rpartition(".")[0]).split(".")
    return ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))


def imports_of(path: Path) -> set[str]:
    """Project modules imported anywhere in ``path`` (top level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {_resolve(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            origin = _origin(path, node)
            for alias in node.names:
                found.add(_resolve(f"{origin}.{alias.name}") or _resolve(origin))
    return {m for m in found if m and m != module_name(path)}


GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_import_graph_has_no_cycle():
    cycles = sorted(m for m in GRAPH if m in reachable(m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_the_reader_finds_imports_inside_functions_and_relative_ones():
    assert "bench.plots" in GRAPH["bench.scale"]            # imported inside plot_scale()
    assert "tasks.plugins" in GRAPH["tasks"]                 # imported inside _base_tasks()
    assert "bench.errors" in GRAPH["bench.store"]            # from .errors import ...


@pytest.mark.parametrize("low, high", [
    ("esgd", "bench"), ("esgd", "tasks"), ("esgd", "cli"), ("tasks", "bench"), ("tasks", "cli"),
    ("bench", "cli"), ("bench.errors", "bench"), ("bench.errors", "tasks"), ("bench.errors", "esgd"),
    ("bench.train", "bench.grid"), ("bench.train", "bench.executors"), ("bench.train", "bench.config"),
    ("bench.steps", "bench.train"), ("bench.executors", "bench.grid"), ("bench.optimizers", "bench.train"),
    ("bench.optimizers", "bench.steps"), ("bench.registry", "bench.optimizers"), ("bench.plugins", "bench.optimizers"),
    ("bench.store", "bench.train"), ("bench.store", "bench.grid"), ("bench.timing", "bench.train"),
    ("bench.grid", "bench.display"), ("bench.grid", "bench.scale"), ("bench.grid", "bench.regress"),
])
def test_layers_depend_one_way(low, high):
    """``low`` (with its submodules) never reaches ``high``: cli -> grid -> executors -> train -> steps ->
    optimizers -> registry, timing, store -> esgd, tasks."""
    starts = [m for m in GRAPH if m == low or m.startswith(low + ".")]
    bad = {f"{s} -> {r}" for s in starts for r in reachable(s) if r == high or r.startswith(high + ".")}
    assert not bad, sorted(bad)


def _private_uses(path: Path) -> list[str]:
    """``module._name`` where ``module`` is another project module imported in this file."""
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _resolve(a.name):
                    aliases[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom):
            for a in node.names:
                if f"{_origin(path, node)}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{_origin(path, node)}.{a.name}"
    return [f"{aliases[n.value.id]}.{n.attr}" for n in ast.walk(tree)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases
            and n.attr.startswith("_") and not n.attr.startswith("__")]


@pytest.mark.parametrize("path", SOURCES + TESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_reaches_into_another_s_private_names(path):
    uses = _private_uses(path)
    if path in TESTS:       # tests may call a private helper, never rewrite another module's state
        tree = ast.parse(path.read_text())
        targets = [t for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.Delete))
                   for t in (n.targets if isinstance(n, ast.Assign) else n.targets)]
        uses = [u for u in uses if any(isinstance(t, (ast.Attribute, ast.Subscript)) and u.split(".")[-1]
                                       in ast.unparse(t) for t in targets)]
        uses += [m.group(0) for m in re.finditer(r"\b\w+\._[A-Z_]{3,}\b(?=\s*(\[|\.pop|\.clear|\.update))",
                                                 path.read_text())]
    assert not uses, uses


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_opens_with_what_it_is_for(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc and len(doc.split()) >= 8, "a module docstring of a sentence or more"


@pytest.mark.parametrize("path", sorted((ROOT / "bench").glob("*.py")), ids=lambda p: p.name)
def test_bench_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= 420


# Issue numbers and development-process remarks, which mean nothing to a user.
PROCESS = re.compile(r"\b(issue|ticket)\s*#?\d+|\(issue\b|\bissue-\d|\bthis session\b|\bthe seed says\b|"
                     r"\bseed's (claim|advice|experiments)\b|\bESGD-M seed\b|not on this machine|shared/ESGD",
                     re.IGNORECASE)


@pytest.mark.parametrize("path", SOURCES + DOCS + TESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_text_speaks_to_users_not_of_how_it_was_made(path):
    if path == Path(__file__).resolve():
        pytest.skip("holds the patterns themselves")
    hits = [m.group(0) for m in PROCESS.finditer(path.read_text())]
    assert not hits, hits


@pytest.mark.parametrize("path", SOURCES + DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documents_the_code_points_to_are_in_the_repository(path):
    text = path.read_text()
    for ref in re.findall(r"\bdocs/[\w.-]+\.md\b", text):
        assert (ROOT / ref).is_file(), ref
    if path.suffix == ".md":
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target):
                assert (path.parent / target).exists(), target


def test_command_line_help_speaks_to_users():
    code = ("from typer.testing import CliRunner\nimport cli\n"
            "names = [c.name for c in cli.app.registered_commands] + ['tasks', 'optimizers']\n"
            "out = [CliRunner().invoke(cli.app, ['--help']).output]\n"
            "out += [CliRunner().invoke(cli.app, [n or c.callback.__name__, '--help']).output "
            "for n, c in zip(names, cli.app.registered_commands)]\n"
            "print('\\n'.join(out))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout and "regress" in done.stdout
    assert not PROCESS.search(done.stdout)
