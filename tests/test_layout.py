"""The packages' import graph, read from the source with `ast` (nothing is imported): no module imports
itself back through any chain, and gss-export's CLI is at most `MAX_CHAIN` gss_export modules from the bottom.

Every `import` and `from ... import` of gss_export's and gss_runtime's own modules counts, at module
level or inside a function (a function-level import hides a cycle, it does not remove it); only those
under `if TYPE_CHECKING:` do not, as they never run. Relative imports are resolved; `from pkg import
name` is an edge to the submodule `pkg.name` where there is one, else to `pkg` itself; importing
`a.b.c` also runs the __init__ of every package on the way that the importer is not already inside.
The chain counts gss_export's modules (gss_runtime, a separate distribution, is where it ends).
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"gss_export": ROOT / "gss_export", "gss_runtime": ROOT / "runtime" / "gss_runtime"}
CLI = "gss_export.cli"
MAX_CHAIN = 7  # gss_export modules, the CLI and the bottom included


def _modules() -> dict[str, tuple[Path, bool]]:
    """module name -> (file, is a package)"""
    found = {}
    for top, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = (top, *path.relative_to(folder).with_suffix("").parts)
            package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(tree: ast.AST):
    """The import statements anywhere in `tree`, but under `if TYPE_CHECKING:` (annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for branch in node.orelse:
                yield from _imports(ast.Module(body=[branch], type_ignores=[]))
        else:
            yield from _imports(node)


@lru_cache(maxsize=None)
def import_graph() -> dict[str, frozenset[str]]:
    """module -> the package modules it imports (directly, anywhere in its body)."""
    modules = _modules()
    graph: dict[str, frozenset[str]] = {}
    for name, (path, package) in modules.items():
        here = name if package else name.rpartition(".")[0]  # the package relative imports start from
        inside = set(_ancestors(name)) | {name}  # packages already initialised when this module runs
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module or ""
                found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for target in found:
                if target.split(".")[0] not in PACKAGES:
                    continue
                assert target in modules, f"{name} imports {target}, which is not a module of {', '.join(PACKAGES)}"
                targets.update(m for m in (*_ancestors(target), target) if m not in inside or m == target != name)
        targets.discard(name)
        graph[name] = frozenset(targets)
    return graph


def find_cycle(graph: dict[str, frozenset[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def longest_chain(graph: dict[str, frozenset[str]], start: str, within: str | None = None) -> list[str]:
    """The longest import chain from `start` (the graph has no cycle), through modules of package `within` only if given."""

    @lru_cache(maxsize=None)
    def chain(node: str) -> tuple[str, ...]:
        below = max((chain(nxt) for nxt in sorted(graph[node]) if within is None or nxt.split(".")[0] == within),
                    key=len, default=())
        return (node, *below)

    return list(chain(start))


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cli_import_chain_is_short():
    graph = import_graph()
    assert find_cycle(graph) is None
    chain = longest_chain(graph, CLI, within="gss_export")
    print(f"longest import chain from {CLI} ({len(chain)} gss_export modules): " + " -> ".join(chain))
    whole = longest_chain(graph, CLI)
    print(f"with gss_runtime's modules ({len(whole)}): " + " -> ".join(whole))
    assert len(chain) <= MAX_CHAIN, f"{len(chain)} modules deep (at most {MAX_CHAIN}): " + " -> ".join(chain)
