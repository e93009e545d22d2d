"""The import structure of ``src/attnmem``: no import circles, no private names across modules.

Read from the source with ``ast``, so the check sees every import statement, including those
inside functions: a function-level import still makes one module depend on the other when the
function runs, and moving an import into a function is the usual way an import circle is hidden
rather than removed, so those count too. Imports under ``if TYPE_CHECKING:`` never run and do
not count.

An edge ``a -> b`` is drawn for each module ``b`` that ``a`` names: ``from pkg import name`` is
an edge to ``pkg.name`` when that is a module, else to ``pkg``. Importing ``pkg.sub`` also runs
``pkg/__init__.py``, but those implicit edges are left out: with them every module importing a
sibling through its package would form a circle with any ``__init__`` that re-exports it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "attnmem"


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted
    names: tuple[str, ...]  # the names taken from it (empty for ``import x``)
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package, dotted name -> file."""
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module that a relative ``from`` names."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports(known: dict[str, Path] | None = None) -> list[Import]:
    """Every import inside the package that targets the package itself."""
    known = known or modules()
    found: list[Import] = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_lines(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PACKAGE:
                        found.append(Import(module, alias.name, (), node.lineno))
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                if base.split(".")[0] != PACKAGE:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    if sub in known:
                        found.append(Import(module, sub, (), node.lineno))
                    else:
                        found.append(Import(module, base, (alias.name,), node.lineno))
    return found


def private_imports(found: list[Import]) -> list[str]:
    """``from m import _name`` across modules: a private name of ``m`` used elsewhere."""
    return [f"{imp.module}:{imp.line} imports {imp.target}.{name}"
            for imp in found for name in imp.names
            if name.startswith("_") and not name.startswith("__") and imp.target != imp.module]


def private_attribute_uses(known: dict[str, Path] | None = None) -> list[str]:
    """``M._name`` where ``M`` is another module of the package bound by an import
    (``from .. import masks as M``): the same private use, spelled as an attribute."""
    known = known or modules()
    found: list[str] = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node.level, node.module)
                for alias in node.names:
                    if f"{base}.{alias.name}" in known:
                        aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in known and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__") and aliases[node.value.id] != module):
                found.append(f"{module}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return found


def cycles(found: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a self-import), each
    sorted: every import circle lies inside one of them (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        graph.setdefault(imp.module, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(comp) > 1 or v in graph[v]:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def test_the_walk_sees_the_package():
    """The checks below mean something only if the walk finds the modules and their imports."""
    found = imports()
    known = modules()
    assert {"attnmem", "attnmem.api", "attnmem.registry", "attnmem.kernels.tiled", "attnmem.masks.base"} <= set(known)
    edges = {(i.module, i.target) for i in found}
    assert ("attnmem.kernels.tiled", "attnmem.kernels.merge") in edges  # from .merge import merge_partials
    assert ("attnmem.mechanisms.sparse", "attnmem.masks") in edges  # from .. import masks as M


def test_cycle_finder_finds_a_circle_and_a_hidden_one():
    """The finder itself, on a made-up graph: a module-level circle, and one closed by an
    import inside a function, are both found; a chain is not."""
    found = [Import("p.a", "p.b", (), 1), Import("p.b", "p.a", (), 9),  # a <-> b
             Import("p.c", "p.d", (), 1), Import("p.d", "p.e", (), 1), Import("p.e", "p.c", (), 40),
             Import("p.x", "p.y", (), 1)]
    assert cycles(found) == [["p.a", "p.b"], ["p.c", "p.d", "p.e"]]
    assert private_imports([Import("p.a", "p.b", ("_hidden", "shown"), 3)]) == ["p.a:3 imports p.b._hidden"]


# What is left while the memory models move beside the methods (issue #15 item 1, another
# change). Nothing may be added here; an entry that is gone must be deleted.
REMAINING_CIRCLES: list[list[str]] = []
REMAINING_PRIVATE: list[str] = []


def _without_line(entry: str) -> str:
    module, rest = entry.split(":", 1)
    return f"{module} {rest.split(' ', 1)[1]}"


def test_no_import_circles_in_src():
    found = cycles(imports())
    new = [c for c in found if c not in REMAINING_CIRCLES]
    stale = [c for c in REMAINING_CIRCLES if c not in found]
    assert new == [], "import circles in src/attnmem (each line one circle's modules):\n" + "\n".join(
        " <-> ".join(c) for c in new)
    assert stale == [], f"circles fixed since: delete them from REMAINING_CIRCLES: {stale}"


def test_no_module_imports_another_modules_private_names():
    found = sorted({_without_line(e) for e in private_imports(imports()) + private_attribute_uses()})
    new = [e for e in found if e not in REMAINING_PRIVATE]
    stale = [e for e in REMAINING_PRIVATE if e not in found]
    assert new == [], "private names imported across modules:\n" + "\n".join(new)
    assert stale == [], f"fixed since: delete them from REMAINING_PRIVATE: {stale}"
