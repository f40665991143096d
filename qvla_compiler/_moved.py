"""Old module paths, kept importable for one release: `import qvla_compiler.hadamard` still works, warns, and
returns the module at its new home (the package tree was regrouped into quant/, inspect/, passes/ …)."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {  # old → new; delete after 0.2
    "qvla_compiler.quantizers": "qvla_compiler.quant.quantizers",
    "qvla_compiler.observers": "qvla_compiler.quant.observers",
    "qvla_compiler.hadamard": "qvla_compiler.quant.hadamard",
    "qvla_compiler.duquant": "qvla_compiler.quant.duquant",
    "qvla_compiler.smoothquant": "qvla_compiler.quant.smoothquant",
    "qvla_compiler.report": "qvla_compiler.inspect.report",
    "qvla_compiler.inspect_report": "qvla_compiler.inspect.summary",
    "qvla_compiler.inspect_html": "qvla_compiler.inspect.html",
    "qvla_compiler.inspect_cli": "qvla_compiler.inspect.commands",
    "qvla_compiler.trace_phases": "qvla_compiler.inspect.trace",
    "qvla_compiler.atm_ohb": "qvla_compiler.calibration",  # the math is also in quant.attention_scales
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old name goes away in qvla_compiler 0.2",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the new module is already executed


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
