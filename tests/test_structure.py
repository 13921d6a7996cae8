"""The package structure: no import cycles, the core never imports a method, methods declare themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ilora.algorithm import available_algorithms, display_name, get_algorithm, method_groups, method_info

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ilora", "baselines")
METHOD_MODULES = {"ilora.method"}  # modules that register methods inside the ilora package


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (function-level imports too)."""
    mods = modules()

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    package = package[: len(package) - node.level + 1]
                    base = ".".join(package + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            deps |= {m for m in map(owner, targets) if m and m != name}
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "ilora.algorithm" in graph and "baselines.fedit" in graph
    assert cycles(graph) == []


def test_the_core_never_imports_a_method():
    graph = import_graph()
    methods = {m for m in graph if m.startswith("baselines")} | METHOD_MODULES
    core = {m for m in graph if m.startswith("ilora") and m not in METHOD_MODULES}
    offenders = {m: sorted(graph[m] & methods) for m in core if graph[m] & methods}
    assert offenders == {}


def test_methods_are_found_through_the_entry_points():
    from importlib.metadata import entry_points

    groups = {ep.value for ep in entry_points(group="ilora.methods")}
    assert {"ilora.method", "baselines"} <= groups
    assert {"fedit", "ffa_lora", "flora", "lora_fair", "ilora", "ilora_s"} <= set(available_algorithms())


@pytest.mark.parametrize("method", available_algorithms())
def test_every_method_declares_its_name_formula_and_options(method):
    info = method_info(method)
    assert info.name == method and get_algorithm(method).name == method
    assert display_name(method) == info.display_name and info.display_name
    assert info.comm_text and callable(info.comm)
    assert (get_algorithm(method).__doc__ or "").strip(), "the first docstring line is shown by `ilora list`"


def test_groups_cover_the_paper_methods():
    groups = method_groups()
    assert set(groups["paper"]) == {"fedit", "ffa_lora", "flora", "lora_fair", "ilora", "ilora_s"}
    assert groups["all"] == available_algorithms()
