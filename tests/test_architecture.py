"""The package's imports follow its layers: no import circles (lazy and type-only imports count),
and no import up a layer. Each subpackage's `__init__` docstring says what it may import
("May import: a, b."); this test reads those lines, so the docstrings cannot drift from the code.
Read with `ast` from the source tree; nothing is imported."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "swapmoe_gguf"
# where each top-level package folder lives in the source tree (converters/ installs as swapmoe_gguf.converters)
SOURCES = {PKG: ROOT / "swapmoe_gguf", f"{PKG}.converters": ROOT / "converters"}
ENTRY_POINTS = {PKG, f"{PKG}.__main__"}  # may import any layer
_MAY = re.compile(r"^May import: (.*)\.$", re.M)


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package is its __init__.py)."""
    out: dict[str, Path] = {}
    for base, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([base, *parts])] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (top level, in functions,
    under TYPE_CHECKING), resolved to module names: `from .x import y` is `x.y` when y is a module."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                if f"{mod}.{a.name}" in known:
                    out.add(f"{mod}.{a.name}")
                elif mod in known:
                    out.add(mod)
    out.discard(name)
    return out


def layer_of(module: str) -> str | None:
    """The layer (top-level subpackage) of a module; None for the entry points."""
    if module in ENTRY_POINTS:
        return None
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def allowed_layers(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Each layer's 'May import:' line, read from its __init__ docstring."""
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        if name.count(".") == 1 and path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            m = _MAY.search(doc)
            assert m, f"{path}: the docstring needs a line 'May import: <layers>.'"
            text = m.group(1).strip()
            out[name.split(".")[1]] = set() if text == "nothing of the package" else {
                x.strip() for x in text.split(",")}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def upward_imports(graph: dict[str, set[str]], allowed: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in sorted(graph.items()):
        ls = layer_of(src)
        for dst in sorted(targets):
            ld = layer_of(dst)
            if ls is None or ld is None or ls == ld:
                continue
            if ld not in allowed.get(ls, set()):
                bad.append(f"{src} imports {dst}: {ls} may import {', '.join(sorted(allowed.get(ls, ()))) or 'nothing'}")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {n: imports(n, p, set(mods)) for n, p in mods.items()}


def test_no_import_circles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_import_goes_up_a_layer(graph):
    allowed = allowed_layers(modules())
    assert set(allowed) == {layer_of(m) for m in graph} - {None}, "every layer says what it may import"
    for layer, below in allowed.items():
        assert below <= set(allowed), f"{layer}: 'May import' names unknown layers {sorted(below - set(allowed))}"
    assert find_cycle(allowed) is None, "the layers' own order has a circle"
    assert upward_imports(graph, allowed) == []


def test_the_tree_is_the_layers():
    """No loose modules beside the layers: the top level holds the entry points only."""
    loose = sorted(p.name for p in SOURCES[PKG].glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert loose == []


def test_the_checks_catch_what_they_look_for():
    """The checker itself: a circle and an upward import in a made-up graph are found."""
    g = {f"{PKG}.a.x": {f"{PKG}.b.y"}, f"{PKG}.b.y": {f"{PKG}.a.z"}, f"{PKG}.a.z": {f"{PKG}.a.x"}}
    assert find_cycle(g) == [f"{PKG}.a.x", f"{PKG}.b.y", f"{PKG}.a.z", f"{PKG}.a.x"]
    assert upward_imports(g, {"a": {"b"}, "b": set()}) == [
        f"{PKG}.b.y imports {PKG}.a.z: b may import nothing"]
    assert imports(f"{PKG}.runtime.llama", SOURCES[PKG] / "runtime" / "llama.py", set(modules())) >= {
        f"{PKG}.planning.calib_cache", f"{PKG}.runtime.hooks", f"{PKG}.residency.policies"}


def test_layout_page_names_every_module():
    """docs/layout.md lists each module file of the package (server/'s in its one entry)."""
    page = (ROOT / "docs" / "layout.md").read_text(encoding="utf-8")
    missing = sorted(p.name for p in modules().values() if p.name != "__init__.py" and p.name not in page)
    assert missing == []
