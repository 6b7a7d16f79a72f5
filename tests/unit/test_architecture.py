"""The layout's promises (issue #10, "Done means"), as tests that fail when one is broken.

- the pure core loads no I/O machinery: importing any `relay.core` module in a fresh interpreter
  loads none of asyncio, socket, ssl, aiohttp, msal, yaml;
- `relay.core` imports only the standard library, `relay.core.*` and the pure config models;
- the pure config models import only the standard library, pydantic and each other;
- there is no import cycle inside `relay/` (imports at module level, in functions and under
  `TYPE_CHECKING` all count: each one is a dependency whose direction the layout fixes);
- no module in `relay/` is over 400 lines;
- no block of six or more identical lines appears twice inside `relay/`.

Each failure names the files and lines to change, so a failure is a to-do list, not a puzzle.
The imports are read from the source with `ast`, never by importing the modules, except in the
subprocess test, whose whole point is what an import really loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "relay"
MAX_LINES = 400
BLOCK = 6
# What the pure core must never load, directly or through anything it imports.
IO_MODULES = ("asyncio", "socket", "ssl", "aiohttp", "msal", "yaml")
# The config modules that hold pure models; `relay.core` may import them (for annotations: at
# run time pydantic itself loads socket, through importlib.metadata and the email package).
PURE_CONFIG_ROOT = "relay.config.schema"


@dataclass(frozen=True, slots=True)
class Edge:
    """`source` imports `target` at `line` of `source`'s file."""

    source: str
    target: str
    line: int


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    """Every module under relay/, by dotted name."""
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


@cache
def _tree(name: str) -> ast.Module:
    path = _modules()[name]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _imported_names(name: str) -> Iterator[tuple[str, int]]:
    """Every absolute module name `name`'s source imports (relative ones resolved), with the
    line, anywhere in the file. `from a import b` yields `a.b` when that is a module, else `a`."""
    is_package = _modules()[name].name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(_tree(name)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield (submodule if submodule in _modules() else base), node.lineno


def _edges(name: str) -> list[Edge]:
    """The imports of `name` that land on another module of relay/."""
    modules = _modules()
    edges = []
    for target, line in _imported_names(name):
        # `import relay.a.b` where only relay.a is a module: the nearest existing module counts.
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target.startswith("relay") and target != name:
            edges.append(Edge(name, target, line))
    return edges


def _rel(name: str) -> str:
    return str(_modules()[name].relative_to(REPO))


def _core_modules() -> list[str]:
    return [name for name in _modules() if name == "relay.core" or name.startswith("relay.core.")]


@cache
def _pure_config_modules() -> frozenset[str]:
    """relay.config.schema and the relay.config modules it imports, transitively."""
    found = {PURE_CONFIG_ROOT}
    todo = [PURE_CONFIG_ROOT]
    while todo:
        for edge in _edges(todo.pop()):
            if edge.target.startswith("relay.config.") and edge.target not in found:
                found.add(edge.target)
                todo.append(edge.target)
    return frozenset(found)


# A fresh interpreter imports one module and reports, for each I/O module it ended up loading,
# the chain of modules whose import pulled it in (outermost first).
_PROBE = """
import importlib, json, sys
watched = set(sys.argv[2].split(","))
chains = {}
class Witness:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in watched and top not in chains:
            chain, frame = [], sys._getframe(1)
            while frame is not None:
                module = frame.f_globals.get("__name__")
                if frame.f_code.co_name == "<module>" and module not in (None, "__main__"):
                    if not chain or chain[-1] != module:
                        chain.append(module)
                frame = frame.f_back
            chains[top] = [*reversed(chain), name]
        return None
sys.meta_path.insert(0, Witness())
importlib.import_module(sys.argv[1])
print(json.dumps({top: chain for top, chain in chains.items() if top in sys.modules}))
"""


def _loaded_io_modules(module: str, watched: tuple[str, ...]) -> dict[str, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, module, ",".join(watched)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"importing {module} failed:\n{result.stderr}"
    loaded: dict[str, list[str]] = json.loads(result.stdout.strip().splitlines()[-1])
    return loaded


@pytest.mark.parametrize("module", _core_modules())
def test_importing_a_core_module_loads_no_io_machinery(module: str) -> None:
    """`python -c "import relay.core.X"` loads none of asyncio, socket, ssl, aiohttp, msal,
    yaml; a failure shows which import chain pulled each one in."""
    loaded = _loaded_io_modules(module, IO_MODULES)
    assert not loaded, f"importing {module} loads I/O modules:\n" + "\n".join(
        f"  {top}: via {' -> '.join(chain)}" for top, chain in sorted(loaded.items())
    )


def test_the_config_schema_loads_no_tls_yaml_or_network_client() -> None:
    """The pure models load no ssl, yaml, cryptography, asyncio, aiohttp or msal. (socket is
    not on the list: pydantic loads it through importlib.metadata and the email package.)"""
    watched = ("asyncio", "ssl", "aiohttp", "msal", "yaml", "cryptography")
    loaded = _loaded_io_modules(PURE_CONFIG_ROOT, watched)
    assert not loaded, f"importing {PURE_CONFIG_ROOT} loads:\n" + "\n".join(
        f"  {top}: via {' -> '.join(chain)}" for top, chain in sorted(loaded.items())
    )


def _foreign_imports(
    modules: list[str], allowed: frozenset[str], third_party: set[str]
) -> list[str]:
    """`file:line imports X` for each import of `modules` outside the standard library,
    `third_party` and the relay modules in `allowed`."""
    problems = []
    for name in modules:
        for target, line in _imported_names(name):
            top = target.partition(".")[0]
            if top == "relay":
                ok = target in allowed or any(target.startswith(f"{a}.") for a in allowed)
            else:
                ok = top in sys.stdlib_module_names or top in third_party
            if not ok:
                problems.append(f"{_rel(name)}:{line} imports {target}")
    return problems


def test_the_core_imports_only_the_standard_library_itself_and_the_pure_config_models() -> None:
    """relay/core depends on nothing that could do I/O: stdlib, relay.core.*, and the pure
    config models (relay.config.schema and the section modules it is made of)."""
    allowed = frozenset({"relay.core"}) | _pure_config_modules()
    problems = _foreign_imports(_core_modules(), allowed, set())
    assert not problems, "relay/core imports beyond its layer:\n  " + "\n  ".join(problems)


def test_the_pure_config_models_import_only_the_standard_library_pydantic_and_each_other() -> None:
    """The schema's modules read no files: no yaml, ssl, socket, cryptography, no relay I/O."""
    pure = sorted(_pure_config_modules())
    assert len(pure) > 1, "relay.config.schema should be made of section modules"
    problems = _foreign_imports(pure, _pure_config_modules(), {"pydantic"})
    problems += [
        f"{_rel(name)}:{line} imports {target}"
        for name in pure
        for target, line in _imported_names(name)
        if target.partition(".")[0] in {"socket", "ssl", "os"}
    ]
    assert not problems, "the pure config models import:\n  " + "\n  ".join(problems)


def _find_cycle(graph: dict[str, list[Edge]]) -> list[Edge] | None:
    """One import cycle as the edges that close it, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path: list[Edge] = []
        stack: list[tuple[str, Iterator[Edge]]] = [(start, iter(graph[start]))]
        state[start] = 1
        while stack:
            node, edges = stack[-1]
            edge = next(edges, None)
            if edge is None:
                state[node] = 2
                stack.pop()
                if path:
                    path.pop()
                continue
            if state.get(edge.target) == 1:
                cycle = [*path, edge]
                first = next(i for i, e in enumerate(cycle) if e.source == edge.target)
                return cycle[first:]
            if not state.get(edge.target):
                state[edge.target] = 1
                path.append(edge)
                stack.append((edge.target, iter(graph.get(edge.target, []))))
    return None


def _cycles(graph: dict[str, list[Edge]]) -> list[list[Edge]]:
    """One cycle per knot of mutually importing modules, each knot reported once."""
    remaining = dict(graph)
    found = []
    while (cycle := _find_cycle(remaining)) is not None:
        found.append(cycle)
        knot = {edge.source for edge in cycle}
        # Drop the knot's modules and look again: other knots are independent of this one.
        remaining = {
            name: [e for e in edges if e.target not in knot]
            for name, edges in remaining.items()
            if name not in knot
        }
    return found


def test_there_is_no_import_cycle_inside_relay() -> None:
    """Imports point one way (SMTP -> policy -> store -> delivery -> Graph); each cycle is
    printed with the file and line of every import in it."""
    graph = {name: _edges(name) for name in _modules()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(
        "  cycle:\n"
        + "\n".join(
            f"    {edge.source} -> {edge.target}  ({_rel(edge.source)}:{edge.line})"
            for edge in cycle
        )
        for cycle in cycles
    )


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_tree() -> None:
    """The search itself: a -> b -> c -> a is found as its three edges, a diamond is no
    cycle, and two separate rings are two findings."""
    ring = {
        "a": [Edge("a", "b", 1)],
        "b": [Edge("b", "c", 2)],
        "c": [Edge("c", "a", 3)],
        "d": [Edge("d", "a", 4)],
    }
    found = _find_cycle(ring)
    assert found is not None
    assert sorted((e.source, e.target) for e in found) == [("a", "b"), ("b", "c"), ("c", "a")]
    diamond = {
        "a": [Edge("a", "b", 1), Edge("a", "c", 1)],
        "b": [Edge("b", "d", 1)],
        "c": [Edge("c", "d", 1)],
        "d": [],
    }
    assert _find_cycle(diamond) is None
    two_rings = {**ring, "x": [Edge("x", "y", 5)], "y": [Edge("y", "x", 6)]}
    assert sorted(len(cycle) for cycle in _cycles(two_rings)) == [2, 3]


def test_no_module_in_relay_is_over_400_lines() -> None:
    """One module, one concern: each module of relay/ stays at or under 400 lines."""
    long = [
        f"{_rel(name)}: {count} lines"
        for name, path in _modules().items()
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    ]
    assert not long, f"modules over {MAX_LINES} lines:\n  " + "\n  ".join(long)


def _code_lines(name: str) -> list[tuple[int, str]]:
    """(line number, whitespace-normalised text) of each line that is not blank, not a comment
    and not part of an import statement."""
    tree = _tree(name)
    imports = {
        line
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
    }
    lines = _modules()[name].read_text(encoding="utf-8").splitlines()
    return [
        (number, " ".join(text.split()))
        for number, text in enumerate(lines, start=1)
        if text.strip() and not text.strip().startswith("#") and number not in imports
    ]


def _duplicate_blocks(files: dict[str, list[tuple[int, str]]], size: int) -> list[str]:
    """Each pair of places where `size` or more consecutive lines are equal, merged into the
    longest run, as `a.py:10-22 = b.py:40-52 (8 lines)`."""
    where: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    for name, lines in files.items():
        texts = tuple(text for _, text in lines)
        for i in range(len(texts) - size + 1):
            where[texts[i : i + size]].append((name, i))
    pairs: set[tuple[str, int, str, int]] = set()
    for places in where.values():
        for k, (name_a, i) in enumerate(places):
            for name_b, j in places[k + 1 :]:
                if name_a != name_b or j - i >= size:
                    pairs.add((name_a, i, name_b, j))
    found = []
    for name_a, i, name_b, j in sorted(pairs):
        if (name_a, i - 1, name_b, j - 1) in pairs:
            continue  # inside a run that starts earlier
        length = size
        while (name_a, i + length - size + 1, name_b, j + length - size + 1) in pairs:
            length += 1
        a, b = files[name_a], files[name_b]
        found.append(
            f"{name_a}:{a[i][0]}-{a[i + length - 1][0]} = "
            f"{name_b}:{b[j][0]}-{b[j + length - 1][0]} ({length} lines)"
        )
    return found


def test_no_block_of_six_identical_lines_appears_twice_inside_relay() -> None:
    """Say it once: six or more consecutive equal lines (blank lines, comments and imports
    aside, whitespace normalised) never appear in two places of relay/."""
    files = {_rel(name): _code_lines(name) for name in _modules()}
    found = _duplicate_blocks(files, BLOCK)
    assert not found, "repeated blocks:\n  " + "\n  ".join(found)


def test_the_duplicate_finder_reports_the_whole_run_once() -> None:
    """The search itself: a 7-line run repeated in another file is one finding of 7 lines with
    both line ranges; a 5-line run is not a finding."""
    run = [(n, f"x{n}") for n in range(7)]
    files = {
        "a.py": [(1, "a"), *[(n + 10, t) for n, t in run]],
        "b.py": [(n + 50, t) for n, t in run],
    }
    assert _duplicate_blocks(files, BLOCK) == ["a.py:10-16 = b.py:50-56 (7 lines)"]
    short = {"a.py": run[:5], "b.py": run[:5]}
    assert _duplicate_blocks(short, BLOCK) == []
