"""The architecture zoo through the whole compiler: per shape, how many linears, how many become integer under the
`all` and `quantvla` layouts, and the output rel-L2 at W8A8 and W4A8 (layout `all`, 4 calibration batches).

    python benchmarks/bench_zoo.py            # a markdown table on stdout

The zoo's modules and inputs are the test suite's (tests/zoo_models.py, tests/passes/test_zoo.py).
"""
from __future__ import annotations

import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

import qvla_compiler

TESTS = Path(__file__).resolve().parents[1] / "tests"


def _zoo():
    sys.path.insert(0, str(TESTS))
    spec = importlib.util.spec_from_file_location("test_zoo", TESTS / "passes" / "test_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ZOO


def measure(case) -> dict:
    torch.manual_seed(0)
    module, args, calib = case.build().eval(), case.inputs(), [case.inputs() for _ in range(4)]
    row = {}
    for recipe, layout in (("w8a8", "all"), ("w4a8", "all"), ("w8a8", "quantvla")):
        started = time.perf_counter()
        qp = qvla_compiler.quantize(module, args, calib, recipe, layout=layout, progress=False,
                                    input_roles=case.input_roles)
        s = qp.report.summary()
        row["linears"] = s["int_linears"] + s["float_linears"]
        row[f"int {layout}"] = s["int_linears"]
        row[f"{recipe}/{layout} rel-L2"] = s["action_rel_l2"]
        row[f"{recipe}/{layout} s"] = round(time.perf_counter() - started, 2)
    return row


def main() -> None:
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, 1 thread")
    cols = ["linears", "int all", "int quantvla", "w8a8/all rel-L2", "w4a8/all rel-L2", "w8a8/all s"]
    print("| shape | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, case in _zoo().items():
        row = measure(case)
        print(f"| {name} | " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
