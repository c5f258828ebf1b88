"""The package's folders are layers and imports point one way (README: Architecture): io/ and arch/ at the ground,
then core/, function/, engine/, distill/; demo/ apart (nothing below it imports it); no cycles between modules, counting
imports inside functions. Imports under `if TYPE_CHECKING:` are for type checkers only and are not counted."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "projection"
RANK = {"errors": 0, "cancel": 0, "runtime": 0, "cache": 0, "io": 1, "arch": 1, "core": 2, "function": 3, "engine": 4,
        "distill": 5, "probe": 6, "demo": 7, "cli": 8, "__main__": 9,
        "__init__": 9}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imported(path: Path) -> set[str]:
    """The package's modules that `path` imports at run time (a package's `__init__` stands for the package)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for stmt in node.body for n in ast.walk(stmt)}
    here = module_name(path).split(".")[:-1]  # the module's package (for a package's __init__, the package)
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only or not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = here[:len(here) - node.level + 1]
        elif (node.module or "").split(".")[0] == "projection":
            base = []
        else:
            continue
        parts = [p for p in (node.module or "").split(".") if p]
        parts = parts[1:] if not node.level else parts
        for alias in node.names:
            target = ".".join([*base, *parts, alias.name])
            out.add(target if (PACKAGE / f"{target.replace('.', '/')}.py").is_file() else ".".join([*base, *parts]))
    return {t for t in out if t and t != "__init__"}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported(p) for p in PACKAGE.rglob("*.py")}


def test_imports_point_one_way():
    upward = [f"{a} -> {b}" for a, targets in graph().items() for b in targets
              if RANK[b.split(".")[0]] > RANK[a.split(".")[0]]
              or {a.split(".")[0], b.split(".")[0]} == {"io", "arch"}]
    assert upward == []


def test_no_import_cycles():
    edges = graph()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in path, f"import cycle: {' -> '.join(path[path.index(node):] + [node])}"
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, [*path, node])
        done.add(node)

    for start in sorted(edges):
        visit(start, [])
