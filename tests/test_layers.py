"""The house's layers (docs/architecture.md, "Layers"), checked on the code's own imports: every
import points down or across its own layer, never up, no module imports another's private name,
and no two modules import each other, however indirectly. Imports inside functions and under
TYPE_CHECKING count like any other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "engine"

#: Bottom first. A module belongs to the first layer one of whose prefixes it has.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("engine.errors", "engine.types", "engine.config", "engine.vectors", "engine.locks",
              "engine.threads", "engine.memory", "engine.version")),
    ("storage", ("engine.storage",)),
    ("text", ("engine.text",)),
    ("state", ("engine.state",)),
    ("models", ("engine.models",)),
    ("serving", ("engine.serving",)),
    ("runtime", ("engine.runtime",)),
    ("training", ("engine.training",)),
    ("replica", ("engine.replica",)),
    ("facade", ("engine.engine", "engine")),
    ("apps", ("engine.streams", "engine.http", "engine.evaluation", "engine.cli", "engine.demo")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").exists() or (ROOT.parent / rel / "__init__.py").exists()


def imports_of(path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every engine import of `path`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "engine" or target.startswith("engine."):
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    out.append((sub, None, node.lineno) if is_module(sub) else (target, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "engine"]
    return out


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or (p != "engine" and module.startswith(p + ".")) for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


FILES = sorted(ROOT.rglob("*.py"))
GRAPH = {module_name(p): imports_of(p) for p in FILES}


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


def test_no_import_points_up():
    up = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]}), line {line}"
          for m, targets in GRAPH.items() for t, _, line in targets if layer_of(t) > layer_of(m)]
    assert not up, "\n".join(up)


def test_no_private_name_is_imported_from_another_module():
    private = [f"{m} imports {name} from {t}, line {line}" for m, targets in GRAPH.items()
               for t, name, line in targets if name is not None and name.startswith("_")
               and not name.endswith("__") and t != m]
    assert not private, "\n".join(private)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_circle():
    # A package's __init__ that re-exports its own modules is not a circle with them: the edges
    # from a module to its own package (Python runs the __init__ first) are not imports of it.
    graph = {m: {t for t, _, _ in targets if not m.startswith(t + ".")} for m, targets in GRAPH.items()}
    assert not cycles(graph), cycles(graph)


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
    ({"a": {"a"}}, [["a"]]),
])
def test_the_circle_finder_finds_circles(graph, expected):
    assert cycles(graph) == expected


def test_an_upward_import_is_seen(tmp_path):
    """The walker reads relative imports, nested ones included, as the modules they name."""
    here = ROOT / "state" / "items.py"
    found = {t for t, _, _ in imports_of(here)}
    assert "engine.state.columns" in found and "engine.vectors" in found
    assert layer_of("engine.runtime.core") > layer_of("engine.state.items")
