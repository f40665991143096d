"""qvla_compiler: VLA policies → low-bit integer programs (QuantVLA as a compiler).

Example::

    import qvla_compiler
    from qvla_compiler.models import build_policy

    policy = build_policy("pi05-tiny")
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe="w8a8")
    print(qp.report.summary())
    qp.save("pi05-tiny-w8a8.pt2")
    loaded = qvla_compiler.load("pi05-tiny-w8a8.pt2")
"""
from qvla_compiler import _moved, kernels  # noqa: F401 — registers the qvla:: ops before any program is loaded
from qvla_compiler.api import LoadedProgram, QuantizedProgram, calibrate, load, quantize
from qvla_compiler.errors import QvlaError
from qvla_compiler.recipes import LAYOUTS, RECIPES, QuantRecipe

__all__ = ["LAYOUTS", "RECIPES", "LoadedProgram", "QuantRecipe", "QuantizedProgram", "QvlaError", "calibrate", "load",
           "quantize"]
__version__ = "0.1.0"
_moved.install()  # old module paths (qvla_compiler.hadamard, …) still import, with a DeprecationWarning


def __getattr__(name: str):
    # `qvla_compiler.backend(plan=...)`: importing torch._dynamo costs seconds, so only when it is asked for.
    if name == "backend":
        import importlib

        return importlib.import_module("qvla_compiler.backend")
    raise AttributeError(f"module 'qvla_compiler' has no attribute {name!r}")
