"""The package layout: no import circles between project modules, and data_pipeline stands alone.

The import graph is read from the source with `ast` (every import statement, at module level or inside
a function: a lazy import that closes a circle is still a circle), over pretrain/, data_pipeline/ and
launch/. On the flat pretrain/ of November 2026 this found config -> generate -> pretrained -> model ->
config and five more modules in one circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("pretrain", "data_pipeline", "launch")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's own __init__ counts as the package)."""
    files = {module_name(root, p): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_project_modules_import_each_other_in_no_circle():
    found = circles(import_graph(REPO))
    assert found == [], "modules that import each other in a circle: " + "; ".join(" <-> ".join(c) for c in found)


def test_data_pipeline_imports_nothing_from_pretrain_or_launch():
    graph = import_graph(REPO)
    bad = {m: sorted(t for t in ts if not t.startswith("data_pipeline")) for m, ts in graph.items()
           if m.startswith("data_pipeline")}
    assert {m: ts for m, ts in bad.items() if ts} == {}


def test_config_imports_no_domain_module():
    """The run config composes the sections' own configs (the data's, the network's), which import nothing."""
    graph = import_graph(REPO)
    assert graph["pretrain.config"] <= {"data_pipeline.config", "pretrain.model.config"}
    assert graph["pretrain.model.config"] == set()


def test_the_circle_check_finds_a_planted_circle(tmp_path):
    pkg = tmp_path / "pretrain"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pretrain.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import x\n")  # lazy and relative
    (pkg / "c.py").write_text("import pretrain.a\nx = 1\n")
    (pkg / "d.py").write_text("from pretrain import c\n")  # into the circle, not part of it
    assert circles(import_graph(tmp_path, ("pretrain",))) == [["pretrain.a", "pretrain.c", "pretrain.sub.b"]]
