"""The package's layers: every import of blockdistill's own modules (lazy ones, inside
functions, included) points to the same layer or one below, the module graph has no
circle, and every module reads in one sitting."""

import ast
import pathlib
import shutil

import pytest

import blockdistill

PACKAGE = pathlib.Path(blockdistill.__file__).parent
#: lowest first; a module may import its own layer or a lower one. The package's root
#: modules (`__init__`, `__main__`, `testing`) are above every layer.
LAYERS = ("_types", "_files", "parallel", "nn", "data", "distill", "interop", "search", "app")
MAX_LINES = 500
LONG_REASON = "This module is long because"


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def imports_of(path: pathlib.Path, root: pathlib.Path) -> set[str]:
    """The package's own modules that `path` imports, anywhere in it (at the top, inside
    functions and classes), resolved to dotted names."""
    own = root.name
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not (target == own or target.startswith(own + ".")):
                continue
            for alias in node.names:  # `from . import x` may name a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if _exists(candidate, root) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == own or a.name.startswith(own + "."))
    return {m for m in found if _exists(m, root)} - {module_name(path, root)}


def _exists(module: str, root: pathlib.Path) -> bool:
    relative = pathlib.Path(*module.split(".")[1:])
    return (root / relative).with_suffix(".py").is_file() or (root / relative / "__init__.py").is_file()


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    return {module_name(p, root): imports_of(p, root) for p in sorted(root.rglob("*.py"))}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import from a lower layer to a higher one, as `importer -> imported`."""
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The circles of the module graph (one per strongly connected component of more than
    one module, or a module importing itself)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_imports_point_down_and_never_in_a_circle():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and all(layer_of(m) < len(LAYERS) or m.count(".") <= 1 for m in graph)
    assert upward_imports(graph) == []
    assert cycles(graph) == []


def test_the_check_catches_an_upward_import_and_a_circle(tmp_path):
    copy = tmp_path / PACKAGE.name
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    model = copy / "nn" / "model.py"
    # a lazy import from the network up to the application
    model.write_text(model.read_text() + "\n\ndef _late():\n    from ..app.cli import main\n    return main\n")
    graph = import_graph(copy)
    assert upward_imports(graph) == [f"{PACKAGE.name}.nn.model -> {PACKAGE.name}.app.cli"]
    # and a circle inside one layer
    config = copy / "nn" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _late():\n    from .model import Transformer\n    return Transformer\n")
    assert [f"{PACKAGE.name}.nn.config", f"{PACKAGE.name}.nn.model"] in [
        [m for m in c if m.endswith((".nn.config", ".nn.model"))] for c in cycles(import_graph(copy))]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_reads_in_one_sitting(path):
    lines = len(path.read_text().splitlines())
    if lines > MAX_LINES:
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert LONG_REASON in docstring, (
            f"{path.relative_to(PACKAGE)} has {lines} lines: split it by what it does, or say in its docstring "
            f"why it must be one module ('{LONG_REASON} ...')")
