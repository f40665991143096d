"""The package layout shows the layers (issue 21): no import cycles among qvla_compiler modules, a short fixed list of
root modules (new code goes into a subpackage), and the old module paths of `_moved.MOVED` still working."""
from __future__ import annotations

import ast
import functools
import importlib
import sys
from pathlib import Path

import networkx
import pytest

from qvla_compiler._moved import MOVED

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "qvla_compiler"
SUBPACKAGES = "quant/, passes/, lowering/, kernels/, inspect/, eval/, models/, integrations/"
ROOT_MODULES = {
    "__init__.py", "_moved.py", "api.py", "artifact.py", "backend.py", "calibration.py", "cli.py", "errors.py",
    "export.py", "meta.py", "pipeline.py", "plan.py", "preflight.py", "program.py", "protocol.py", "recipes.py",
    "tuning.py",  # a calibration phase that runs programs (float teacher, planned student), as calibration.py does
}


def _modules() -> dict[str, Path]:
    """{dotted module name: file} of every module under qvla_compiler/ (a package under its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported_names(name: str, path: Path):
    """Every dotted name `name` imports anywhere in its file (module level, functions, TYPE_CHECKING blocks): `x`
    for `import x`, and `x` and `x.y` for `from x import y` (y may be a submodule); relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


@functools.lru_cache(maxsize=None)
def import_graph() -> networkx.DiGraph:
    """module → qvla_compiler module it imports; a module importing one of its own parent packages is left out
    (the parent is already being imported when the submodule runs)."""
    modules = _modules()
    graph = networkx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in _imported_names(name, path):
            target = MOVED.get(target, target)
            if target in modules and target != name and not name.startswith(target + "."):
                graph.add_edge(name, target)
    return graph


def test_import_graph_sees_the_package():
    graph = import_graph()
    assert graph.number_of_nodes() > 50
    assert graph.has_edge("qvla_compiler.integrations.lerobot_groot", "qvla_compiler.integrations._lerobot_base")
    assert graph.has_edge("qvla_compiler.integrations.lerobot", "qvla_compiler.integrations.lerobot_groot")


def _cycles(within: str = "qvla_compiler") -> list[str]:
    return sorted(" → ".join([*c, c[0]]) for c in networkx.simple_cycles(import_graph())
                  if any(m == within or m.startswith(within + ".") for m in c))


def test_no_import_cycles_through_integrations():
    cycles = _cycles("qvla_compiler.integrations")
    assert cycles == [], (f"{len(cycles)} import cycle(s) through qvla_compiler.integrations; the adapters import "
                          "their shared base from _lerobot_base, never from lerobot (which imports them):\n"
                          + "\n".join(f"  {c}" for c in cycles))


def test_no_import_cycles():
    # Found when this test was written (issue 21), outside integrations/ and left for the owners of those modules
    # to break, not to be listed here as allowed: export → passes (export.py's function-level import of
    # fold_computed_weights / normalize_graph) → passes.assign_regions → export, and export ↔ program
    # (export.py's function-level import of Program, program.py's OBS_KEYS). Keep this assertion strict.
    cycles = _cycles()
    assert cycles == [], (
        f"{len(cycles)} import cycle(s) among qvla_compiler modules (function-level imports count too); move what both "
        f"sides need into a lower module both import (as integrations/_lerobot_base.py does for the adapters):\n"
        + "\n".join(f"  {c}" for c in cycles))


def test_package_root_holds_only_the_listed_modules():
    found = {p.name for p in PACKAGE.glob("*.py")}
    assert found == ROOT_MODULES, (
        f"qvla_compiler/ root modules changed: new {sorted(found - ROOT_MODULES)}, gone {sorted(ROOT_MODULES - found)}. "
        f"new code goes into a subpackage ({SUBPACKAGES}) or justify adding a root module here (ROOT_MODULES in "
        "tests/test_layout.py)")


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_import_warn_and_alias(old):
    new = importlib.import_module(MOVED[old])
    parent, _, leaf = old.rpartition(".")
    saved_module, saved_attr = sys.modules.pop(old, None), getattr(sys.modules[parent], leaf, None)
    try:
        with pytest.warns(DeprecationWarning, match=MOVED[old].replace(".", r"\.")):
            module = importlib.import_module(old)
    finally:
        if saved_module is not None:
            sys.modules[old] = saved_module
        if saved_attr is not None:
            setattr(sys.modules[parent], leaf, saved_attr)
    assert module is new, f"import {old} gave {module!r}, not {MOVED[old]}"
