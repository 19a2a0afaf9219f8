"""The layout is the architecture: packages by layer, imports only point down.

Order, bottom to top (docs/architecture.rst): leaf types (errors, events),
config, core, layers, then testing and io side by side (neither imports the
other), blocking, services, cli.  ``groupcomm/__init__.py`` re-exports names
lazily, so it may name anything without importing it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "groupcomm"

RANK = {
    "errors": 0, "events": 0, "config": 1, "core": 2, "layers": 3,
    "testing": 4, "io": 4, "blocking": 5, "services": 6, "cli": 7, "__main__": 8,
}
SIDE_BY_SIDE = {frozenset({"testing", "io"})}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Every groupcomm module ``path`` imports, type-only and function-local imports included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("groupcomm"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("groupcomm"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)   # `from pkg import module`
    modules = _modules()
    return {name for name in found if name in modules and name != module}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _private_names(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("groupcomm"):
            bad += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return bad


def test_imports_only_point_down():
    wrong = []
    for module, path in _modules().items():
        if module == "groupcomm":
            continue                                   # lazy re-exports, checked below
        here = _layer(module)
        for target in _imports(path, module):
            there = _layer(target)
            if there == "" or there == here:
                continue
            if RANK[there] > RANK[here] or (RANK[there] == RANK[here] and frozenset({here, there}) in SIDE_BY_SIDE):
                wrong.append(f"{module} imports {target} ({here} -> {there})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(sorted(wrong))


def test_there_are_no_import_cycles():
    graph = {m: _imports(p, m) for m, p in _modules().items() if m != "groupcomm"}
    for deps in graph.values():
        deps.discard("groupcomm")
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]) if dep in stack else f"{node} -> {dep}")
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_module_imports_another_modules_private_names():
    bad = {m: names for m, p in _modules().items() if (names := _private_names(p))}
    assert not bad, bad


@pytest.mark.parametrize(
    ("package", "must_not_load"),
    [
        ("groupcomm", ["trio", "msgpack", "groupcomm.io", "groupcomm.core", "groupcomm.layers", "groupcomm.testing"]),
        ("groupcomm.config", ["trio", "msgpack", "cffi", "groupcomm.core", "groupcomm.layers", "groupcomm.io", "groupcomm.testing"]),
        ("groupcomm.core", ["trio", "msgpack", "groupcomm.layers", "groupcomm.io", "groupcomm.testing"]),
        ("groupcomm.layers", ["trio", "groupcomm.io", "groupcomm.testing", "groupcomm.cli"]),
        ("groupcomm.testing", ["trio", "groupcomm.io", "groupcomm.cli"]),
        ("groupcomm.io", ["groupcomm.testing", "groupcomm.cli", "groupcomm.services"]),
    ],
)
def test_importing_a_package_loads_only_what_is_below_it(package, must_not_load):
    code = (
        f"import sys, {package}\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    leaked = sorted(m for m in loaded for bad in must_not_load if m == bad or m.startswith(bad + "."))
    assert not leaked, f"import {package} loaded {leaked}"


def test_the_public_names_stay_importable_from_the_top():
    import groupcomm

    assert sorted(groupcomm.__all__) == sorted(groupcomm._EXPORTS)     # the lazy table and __all__ agree
    for name in groupcomm.__all__:
        assert getattr(groupcomm, name) is not None, name
    from groupcomm import ALL, Channel, Ring, SimCluster, Space, View, open_channel  # noqa: F401


def test_the_sans_io_layers_import_without_trio():
    out = subprocess.run(
        [sys.executable, "-P", "-c", "import groupcomm.layers, sys; assert 'trio' not in sys.modules"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr


def test_every_package_is_installed() -> None:
    """A package missing from pyproject's list is absent from a wheel (the editable install hides it)."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(root).parts) for init in (root / "groupcomm").rglob("__init__.py")}
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"
