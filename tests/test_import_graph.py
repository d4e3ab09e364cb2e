"""The package's import graph has no cycle, between modules (issue 10: build <-> loop imported each
other) or between packages (issue 20: train -> sync -> train, config -> models -> config), and every
package imports only layers below it (`LAYERS`): sync/ and checkpoint/ never import train/, config.py
imports no package.

Every module of megatron_vppo is parsed (AST, nothing imported): module-level and function-level
imports count, imports under `if TYPE_CHECKING:` do not (they never run). An import of a package
is an edge to its __init__; `from pkg import name` is an edge to `pkg.name` when that is a module,
else to `pkg`."""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import megatron_vppo

ROOT = Path(megatron_vppo.__file__).resolve().parent
PKG = "megatron_vppo"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """Modules of the package that `tree` imports (outside TYPE_CHECKING blocks)."""
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        while name and name not in known:  # `a.b.c` where c is a function: the module is `a.b`
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PKG:
                    found.add(resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] == PKG:
                for alias in node.names:
                    sub = f"{src}.{alias.name}"
                    found.add(sub if sub in known else resolve(src))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(None)
    found.discard(module)
    return found


@functools.lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    """module -> modules of the package it imports (parsed once per session; callers must not mutate)."""
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = _imports(tree, name, path.name == "__init__.py", known)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS, deterministic order)."""
    color = {n: 0 for n in graph}
    for start in sorted(graph):
        if color[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        color[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                color[node] = 2
                stack.pop()
                path.pop()
                continue
            if nxt not in color:
                continue
            if color[nxt] == 1:
                return path[path.index(nxt):] + [nxt]
            if color[nxt] == 0:
                color[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_the_graph_sees_function_level_imports_and_skips_type_checking():
    """The walker itself: the edges it must see (and the one it must not) on known modules."""
    g = import_graph()
    assert "megatron_vppo.train.build" in g["megatron_vppo.train.run"]  # module level
    assert "megatron_vppo.reward.grade" in g["megatron_vppo.train.evaluate"]  # inside a function
    assert "megatron_vppo.train.loop" not in g["megatron_vppo.train.checkpointer"]  # TYPE_CHECKING only
    assert "megatron_vppo.rollout" in g["megatron_vppo.train.build"]  # `from megatron_vppo.rollout import ENGINES`
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Low to high; a package may import its own layer and the ones below. Top-level modules are packages of one.
LAYERS = (
    {"__init__", "torchvision_compat", "console", "errors", "stop_signals", "lazy_registry", "parallel_layout", "config"},
    {"megatron_cpu", "distributed"},
    {"models"},
    {"algo", "data", "reward"},
    {"checkpoint"},
    {"sync"},
    {"rollout"},
    {"run_config"},
    {"train", "tuning"},
    {"cli"},
)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_graph() -> dict[str, dict[str, list[tuple[str, str]]]]:
    """package -> {imported package: [(module, imported module), ...]} (function-level imports included)."""
    out: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for mod, deps in import_graph().items():
        out.setdefault(_package(mod), {})
        for dep in deps:
            if _package(dep) != _package(mod):
                out[_package(mod)].setdefault(_package(dep), []).append((mod, dep))
    return out


def test_no_package_cycle():
    graph = package_graph()
    cycle = find_cycle({p: set(deps) for p, deps in graph.items()})
    assert cycle is None, "package import cycle: " + " -> ".join(cycle)


def test_packages_import_only_lower_layers():
    layer = {p: i for i, ps in enumerate(LAYERS) for p in ps}
    graph = package_graph()
    assert set(graph) <= set(layer), f"packages without a layer in LAYERS: {sorted(set(graph) - set(layer))}"
    upward = [f"{a} -> {b}" for p, deps in graph.items() for q, edges in deps.items() if layer[q] > layer[p]
              for a, b in edges]
    assert not upward, "imports that point up a layer: " + "; ".join(sorted(upward))
    assert "train" not in graph["sync"] and "train" not in graph["checkpoint"] and not graph["config"]
