"""The packages show the architecture: the import arrows, no cycles, no borrowed private names.

Every module of the project's packages is read with ``ast`` (no import runs), function-level
imports included, and checked against the arrows of the design (README "Layout"):

    encoders <- index <- service        encoders <- generate, world
    train -> encoders, generate, world, evaluation    evaluation -> index, encoders
    bindsearch (the CLI root) -> anything

Cycles: module-level and function-level imports both count (a lazy import hides a cycle, it does
not remove it); imports under ``if TYPE_CHECKING:`` never run and are left out of the cycle check
only (they still count for the arrows). Importing ``pkg.sub`` also runs ``pkg/__init__``; that
implicit edge is not counted, as in every import-graph tool.

Private names: ``from M import _x`` or ``M._x`` where ``_x`` is not a module is private to ``M``;
a private module ``pkg._m`` may be imported only from inside its top-level package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "encoders",
    "index",
    "service",
    "train",
    "generate",
    "world",
    "evaluation",
    "bindsearch",
)

# The arrows: which other top-level packages each one may import.
ALLOWED: dict[str, frozenset[str]] = {
    "encoders": frozenset(),
    "index": frozenset({"encoders"}),
    "generate": frozenset({"encoders"}),
    "world": frozenset({"encoders"}),
    "train": frozenset({"encoders", "generate", "world", "evaluation"}),
    "evaluation": frozenset({"index", "encoders"}),
    "service": frozenset({"index", "encoders", "generate", "world"}),
    "bindsearch": frozenset(PACKAGES) - {"bindsearch"},
}


@dataclass(frozen=True)
class Import:
    importer: str
    module: str  # the most specific project module the statement reaches
    names: tuple[str, ...]  # names taken from it (from-imports); () for `import x`
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`
    alias: str | None = None  # the local name bound to `module` itself, if any


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``packages`` under ``root``."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, type_only: bool = False) -> Iterator[tuple[ast.AST, bool]]:
    """Every node below ``node``, with whether it sits under ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            yield child, type_only
            for sub in child.body:
                yield sub, True
                yield from _walk(sub, True)
            for sub in child.orelse:
                yield sub, type_only
                yield from _walk(sub, type_only)
            continue
        yield child, type_only
        yield from _walk(child, type_only)


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a project module (None: not ours)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        cand = ".".join(parts[:n])
        if cand in modules:
            return cand
    return None


def read_imports(modules: dict[str, Path]) -> list[Import]:
    """Every import statement of every module that reaches a project module."""
    found: list[Import] = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node, type_only in _walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    target = _project_module(a.name, modules)
                    if target is not None:
                        bound = a.asname if a.asname else None
                        found.append(Import(mod, target, (), node.lineno, type_only, bound))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    src = node.module or ""
                if _project_module(src, modules) is None:
                    continue
                plain = []
                for a in node.names:
                    sub = f"{src}.{a.name}"
                    if sub in modules:  # `from pkg import submodule`
                        local = a.asname or a.name
                        found.append(Import(mod, sub, (), node.lineno, type_only, local))
                    else:
                        plain.append(a.name)
                if plain:
                    target = _project_module(src, modules)
                    assert target is not None
                    found.append(Import(mod, target, tuple(plain), node.lineno, type_only))
    return found


def _top(module: str) -> str:
    return module.split(".")[0]


def arrow_violations(imports: list[Import]) -> list[str]:
    """``importer -> module`` lines that go against ``ALLOWED``."""
    bad = []
    for imp in imports:
        src, dst = _top(imp.importer), _top(imp.module)
        if src != dst and dst not in ALLOWED.get(src, frozenset()):
            bad.append(f"{imp.importer}:{imp.line} imports {imp.module} ({src} -> {dst})")
    return bad


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected groups of modules (Tarjan) over the imports that run."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.type_only and imp.module != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.module)
            graph.setdefault(imp.module, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth = longest import chain: small
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(modules: dict[str, Path], imports: list[Import]) -> set[tuple[str, str, str]]:
    """(importer, module, name) for every private name one module takes from another."""
    out: set[tuple[str, str, str]] = set()
    for imp in imports:
        if imp.module == imp.importer:
            continue
        # a private module (any `_part` of its dotted name) is for its own top-level package
        private_parts = [p for p in imp.module.split(".") if _private(p)]
        if private_parts and _top(imp.module) != _top(imp.importer):
            for name in imp.names or (imp.module.rsplit(".", 1)[-1],):
                out.add((imp.importer, imp.module, name))
        for name in imp.names:
            if _private(name):
                out.add((imp.importer, imp.module, name))
    # `alias._x` where alias is a project module bound by an import
    for mod, path in modules.items():
        aliases = {
            imp.alias: imp.module
            for imp in imports
            if imp.importer == mod and imp.alias and imp.module != mod
        }
        if not aliases:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                out.add((mod, aliases[node.value.id], node.attr))
    return out


# ---- the project -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, Path], list[Import]]:
    modules = find_modules(ROOT, PACKAGES)
    return modules, read_imports(modules)


def test_every_package_is_walked(project: tuple[dict[str, Path], list[Import]]) -> None:
    modules, imports = project
    assert {_top(m) for m in modules} == set(PACKAGES)
    # the walk sees function-level imports too: service/demo.py imports the world lazily
    assert any(i.importer == "service.demo" and _top(i.module) == "world" for i in imports)


def test_imports_follow_the_package_arrows(
    project: tuple[dict[str, Path], list[Import]],
) -> None:
    _, imports = project
    assert arrow_violations(imports) == []


def test_service_never_imports_train(project: tuple[dict[str, Path], list[Import]]) -> None:
    _, imports = project
    assert [i for i in imports if _top(i.importer) == "service" and _top(i.module) == "train"] == []


def test_no_import_cycle(project: tuple[dict[str, Path], list[Import]]) -> None:
    _, imports = project
    assert find_cycles(imports) == []


def test_no_private_name_crosses_a_module(
    project: tuple[dict[str, Path], list[Import]],
) -> None:
    modules, imports = project
    assert sorted(private_uses(modules, imports)) == []


# ---- the checker itself, on a made-up tree ---------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> tuple[dict[str, Path], list[Import]]:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    pkgs = tuple(sorted({rel.split("/")[0] for rel in files}))
    modules = find_modules(root, pkgs)
    return modules, read_imports(modules)


def test_checker_finds_a_lazy_cycle_but_not_a_type_only_one(tmp_path: Path) -> None:
    _, imports = _tree(
        tmp_path,
        {
            "encoders/__init__.py": "",
            "encoders/a.py": "from .b import f\n",
            "encoders/b.py": "def f():\n    from . import a\n",
            "encoders/c.py": "from typing import TYPE_CHECKING\nfrom .d import g\n",
            "encoders/d.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import x\n"
            ),
        },
    )
    assert find_cycles(imports) == [["encoders.a", "encoders.b"]]


def test_checker_finds_wrong_arrows_and_private_names(tmp_path: Path) -> None:
    modules, imports = _tree(
        tmp_path,
        {
            "encoders/__init__.py": "from ._impl import run\n",
            "encoders/_impl.py": "def run():\n    from index.store import open_\n",
            "encoders/video.py": "_helper = 1\n",
            "index/__init__.py": "",
            "index/store.py": (
                "import encoders.video as V\n"
                "from encoders.video import _helper\n"
                "from encoders._impl import run\n"
                "x = V._helper\n"
                "def open_():\n    pass\n"
            ),
        },
    )
    assert arrow_violations(imports) == ["encoders._impl:2 imports index.store (encoders -> index)"]
    assert private_uses(modules, imports) == {
        ("index.store", "encoders.video", "_helper"),
        ("index.store", "encoders._impl", "run"),
    }


# ---- one command line --------------------------------------------------------------------------


def test_the_console_script_is_the_one_cli_root() -> None:
    import subprocess
    import sys
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["scripts"] == {"bindsearch": "bindsearch.cli:main"}
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert set(PACKAGES) <= set(found)
    assert set(PACKAGES) <= set(pyproject["tool"]["mypy"]["files"])
    # every package mounts its commands on the root; `python -m bindsearch` is the same root
    out = subprocess.run(
        [sys.executable, "-m", "bindsearch", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=ROOT,
    ).stdout
    for command in (
        "weights",
        "embed",
        "index",
        "serve",
        "generate",
        "train",
        "train-decoder",
        "demo",
    ):
        assert f" {command} " in out, command
