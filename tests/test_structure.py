"""The package's import graph: no cycle, imports that only go down the layers (server -> core -> files ->
platform), and the HTTP and transport modules reach the model processes only through the orchestrator. Every import
counts: at module level, inside a function and under TYPE_CHECKING (a cycle dodged by a late import is still a
cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import model_orchestrator

PACKAGE = Path(model_orchestrator.__file__).parent
LAYERS = ("platform", "files", "core", "server")  # bottom to top; cli.py stands above them all


def module_name(path: Path, package_dir: Path = PACKAGE) -> str:
    parts = path.relative_to(package_dir).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def imports(source: str, name: str) -> set[str]:
    """The package's modules (dotted below the package: `core.lifecycle`) that module `name` imports."""
    here = name.split(".")[:-1]  # its subpackage
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here[:len(here) - (node.level - 1)] if node.level > 1 else here
            target = base + (node.module.split(".") if node.module else [])
            if node.module:
                out.add(".".join(target))
            else:
                out |= {".".join(target + [a.name]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("model_orchestrator"):
            rest = node.module.split(".")[1:]
            out |= {".".join(rest)} if rest else {a.name for a in node.names}
            out |= {".".join(rest + [a.name]) for a in node.names} if rest else set()
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("model_orchestrator.")}
    return out


def import_graph(package_dir: Path = PACKAGE) -> dict[str, set[str]]:
    files = {module_name(p, package_dir): p for p in package_dir.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for target in imports(path.read_text(), name):
            while target and target not in files:  # `from ..core import lora`: the module, not the package
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = {stack.pop()}
            while v not in component:
                component.add(stack.pop())
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer(module: str) -> int:
    first = module.split(".")[0]
    return LAYERS.index(first) if first in LAYERS else len(LAYERS)


def test_the_graph_sees_every_kind_of_import():
    source = ("from .a import x\nfrom . import b\nimport model_orchestrator.core.c\nfrom model_orchestrator.files import d\n"
              "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..platform.e import T\n"
              "def f():\n    from .g import z\n")
    assert imports(source, "core.m") == {"core.a", "core.b", "core.c", "files", "files.d", "platform.e", "core.g"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_every_module_sits_in_a_layer_and_imports_only_go_down():
    graph = import_graph()
    loose = [m for m in graph if layer(m) == len(LAYERS) and m not in ("__init__", "__main__", "cli")]
    assert loose == [], f"modules outside the layers: {loose}"
    up = [(m, t) for m, ts in graph.items() for t in ts if layer(t) > layer(m) and m not in ("__main__", "cli")]
    assert up == [], f"imports going up a layer: {up}"


def test_http_and_transport_do_not_import_lifecycle():
    graph = import_graph()
    assert "core.lifecycle" in graph
    assert {m for m in graph if m.startswith("server.") and "core.lifecycle" in graph[m]} == set()


def test_docs_architecture_tree_lists_every_module_under_its_layer():
    """docs/architecture.md's tree is the map a newcomer reads: every module of a layer is named in that layer's
    branch (a module added, moved or renamed without the map fails here)."""
    text = (PACKAGE.parents[2] / "docs/architecture.md").read_text()
    tree = text[text.index("```", text.index("## The tree")):]
    tree = tree[:tree.index("```", 3)]
    heads = sorted((tree.index(f"── {layer}/"), layer) for layer in LAYERS)  # each layer's line in the tree
    branches = {layer: tree[at:nxt] for (at, layer), nxt in zip(heads, [h for h, _ in heads[1:]] + [len(tree)])}
    missing = [f"{layer}/{p.name}" for layer in LAYERS for p in sorted((PACKAGE / layer).glob("*.py"))
               if p.name != "__init__.py" and p.name not in branches[layer]]
    assert not missing, f"docs/architecture.md's tree does not name: {missing}"
