"""The architecture zoo through the whole compiler: per shape, how many linears, how many become integer under the
`all` and `quantvla` layouts, and the output rel-L2 at W8A8 and W4A8 (layout `all`, 4 calibration batches).

    python benchmarks/bench_zoo.py            # a markdown table on stdout
    python benchmarks/bench_zoo.py --recipes w8a8 quantvla-w4a8 omega-w4a4   # every linear integer (layout all):
        # rel-L2 per recipe, and per shape for the first recipe: saved → loaded bit-identical, batch 3 after
        # quantizing at 2, torch.compile(backend="qvla") with the program's plan against the program, and the
        # compiled program (module(), Inductor) at batch 1 against the eager one, called twice
    python benchmarks/bench_zoo.py --recipes w8a8 --shapes stacked_experts autocast_block   # only these shapes

The zoo's modules and inputs are the test suite's (tests/zoo_models.py, tests/passes/test_zoo.py).
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
import tempfile
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


def _rel(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def checks(case, recipe: str) -> list[str]:
    """rel-L2 under `recipe` (layout all), saved == loaded, batch 3 vs float, backend vs program, compiled program at
    batch 1 vs eager."""
    torch.manual_seed(0)
    module, args, calib = case.build().eval(), case.inputs(), [case.inputs() for _ in range(2)]
    qp = qvla_compiler.quantize(module, args, calib, recipe, layout="all", progress=False,
                                input_roles=case.input_roles)
    program, leaves = qp.module(compiled=False), torch.utils._pytree.tree_leaves
    with tempfile.TemporaryDirectory() as folder:
        try:
            loaded = qvla_compiler.load(qp.save(Path(folder) / "zoo.pt2")).module(compiled=False)
            same = str(all(torch.equal(a, b) for a, b in zip(leaves(program(*args)), leaves(loaded(*args)))))
        except qvla_compiler.QvlaError as exc:  # a program torch.export cannot serialize (flex_attention)
            same = type(exc).__name__
    wider = tuple(torch.cat([a, a[:1]]) if isinstance(a, torch.Tensor) and a.dim() else a for a in args)
    try:
        with torch.no_grad():  # flex_attention has no CPU backward: the float module refuses grad-enabled calls
            batch = f"{_rel(leaves(program(*wider))[0], leaves(module(*wider))[0]):.4f}"
    except Exception as exc:  # noqa: BLE001 — a module that fixes its batch keeps the example's
        batch = type(exc).__name__
    backend = qvla_compiler.backend(plan=qp.quant_plan, inductor=False)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(module, backend=backend)(*args)
    return [f"{qp.report.action_rel_l2:.4f}", same, batch,
            f"{_rel(leaves(compiled)[0], leaves(program(*args))[0]):.1e}", _compiled_at_batch_1(qp, program, args)]


def _compiled_at_batch_1(qp, program, args) -> str:
    """rel-L2 of the Inductor-compiled program (what module() runs) against the eager one at batch 1, where one-row
    GEMMs occur; "varies" if two calls on the same input differ."""
    one = tuple(a[:1] if isinstance(a, torch.Tensor) and a.dim() else a for a in args)
    leaves = torch.utils._pytree.tree_leaves
    torch._dynamo.reset()
    fast = qp.module(compiled=True)
    try:
        with torch.no_grad():
            first, again, want = leaves(fast(*one))[0], leaves(fast(*one))[0], leaves(program(*one))[0]
    except Exception as exc:  # noqa: BLE001 — a module that fixes its batch takes only the example's
        return type(exc).__name__
    if fast.fallback.reason is not None:
        return "eager fallback"
    return f"{_rel(first, want):.1e}" + ("" if torch.equal(first, again) else " (varies)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", nargs="+", help="the recipe table instead of the layout table")
    ap.add_argument("--shapes", nargs="+", help="only these zoo shapes (default: all)")
    args = ap.parse_args()
    zoo = {name: case for name, case in _zoo().items() if not args.shapes or name in args.shapes}
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, 1 thread")
    if args.recipes:
        first = args.recipes[0]
        cols = [*args.recipes[1:], f"{first}: saved = loaded", "batch 3 rel-L2", "backend vs program",
                "compiled b1 vs eager"]
        print(f"| shape | {first} rel-L2 | " + " | ".join(cols) + " |")
        print("|---" * (len(cols) + 2) + "|")
        for name, case in zoo.items():
            first_row = checks(case, first)
            rest = [checks(case, r)[0] for r in args.recipes[1:]]
            print(f"| {name} | {first_row[0]} | " + " | ".join(rest + first_row[1:]) + " |", flush=True)
        return
    cols = ["linears", "int all", "int quantvla", "w8a8/all rel-L2", "w4a8/all rel-L2", "w8a8/all s"]
    print("| shape | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, case in zoo.items():
        row = measure(case)
        print(f"| {name} | " + " | ".join(str(row[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
