"""The package's layers (docs/architecture.md), checked on its import graph: data flows down.

Every import counts, also one inside a function or under `if TYPE_CHECKING:`: a function-local import is as much a
dependency as a top-level one, it is only paid later. A module may import its own layer and the layers below it;
no import goes up, there is no cycle, and no core module imports a task (the built-in tasks are plug-ins on the
same contract as a user's own).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hpctrain"

# Bottom to top: the one place the layers are written down (docs/architecture.md draws the same).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("contract", ("hpctrain.config", "hpctrain.instantiate", "hpctrain.callbacks", "hpctrain.transforms",
                  "hpctrain.optim")),
    ("process", ("hpctrain.process",)),
    ("data", ("hpctrain.data",)),
    ("run", ("hpctrain.run",)),
    ("loggers", ("hpctrain.loggers",)),
    ("composition", ("hpctrain.components",)),
    ("launching", ("hpctrain.launching",)),
    ("tuning", ("hpctrain.tuning",)),
    ("use", ("hpctrain.use",)),
    ("commands", ("hpctrain.launch", "hpctrain.predict", "hpctrain.test", "hpctrain.export", "hpctrain.inspect",
                  "hpctrain.tune", "hpctrain.prepare")),
    ("package", ("hpctrain",)),  # hpctrain/__init__.py: load_model, load_run
    ("tasks", ("hpctrain.tasks",)),  # plug-ins: they may use anything; nothing of the core may use them
]


def module_names(package: Path) -> dict[str, Path]:
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names[name] = path
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (top-level and function-local imports alike)."""
    modules = module_names(package)

    def resolve(name: str) -> str | None:  # a module, or the module defining a name (`from a.b import C`)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    parts = parts[:len(parts) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names]
            else:
                continue
            for name in names:
                # hpctrain.conf is the configs' data package (conf/, mapped by pyproject.toml), not code here.
                if not name.startswith(package.name) or name.startswith(f"{package.name}.conf"):
                    continue
                target = resolve(name)
                if target is not None and target != module:
                    targets.add(target)
        graph[module] = targets
    return graph


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming the module's layer."""
    best, index = -1, -1
    for position, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, index = len(prefix), position
    if index < 0:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_architecture.py and to "
                             f"docs/architecture.md")
    return index


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    tasks = layer_of("hpctrain.tasks")
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) == tasks and layer_of(module) != tasks:
                problems.append(f"{module} imports the task {target}: the core never imports a task")
            elif layer_of(target) > layer_of(module):
                problems.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                                f"({LAYERS[layer_of(target)][0]}), a layer above it")
    return problems


def test_no_import_cycle() -> None:
    assert cycles(import_graph(PACKAGE)) == []


def test_no_layer_imports_one_above_it() -> None:
    assert upward_imports(import_graph(PACKAGE)) == []


def test_every_module_is_in_a_layer() -> None:
    for module in import_graph(PACKAGE):
        layer_of(module)


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "hpctrain"
    for path in PACKAGE.rglob("*.py"):
        target = copy / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return copy


def test_the_checks_catch_a_cycle_and_an_upward_import(package_copy: Path) -> None:
    """The same checks on a copy of the package with one function-local import added, as a careless change
    would: the checkpoint module reaching up to the composition root."""
    assert cycles(import_graph(package_copy)) == [] and upward_imports(import_graph(package_copy)) == []
    checkpoint = package_copy / "run" / "checkpoint.py"
    checkpoint.write_text(checkpoint.read_text() + "\n\ndef _reach_up():\n    from hpctrain.components import "
                                                   "build_components\n")
    graph = import_graph(package_copy)
    assert any("hpctrain.run.checkpoint" in component and "hpctrain.components" in component
               for component in cycles(graph))
    assert "hpctrain.run.checkpoint (run) imports hpctrain.components (composition), a layer above it" in \
        upward_imports(graph)
