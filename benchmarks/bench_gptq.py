"""Weight rounding at 4 bits: RTN vs MSE clip vs GPTQ, per recipe, on the reference policies (issue 20).

For each model × recipe: action rel-L2 and SQNR of the quantized sampler against float (same inputs and noise as
`quantize` measures), and the compile time. A name is a preset plus options joined by "+": `gptq` (weight_method
"gptq"), `mse` (weight_clip "mse": RTN with the MSE clip search), `awq` (smooth "awq"); e.g. `quantvla-w4a8+gptq+awq`.

    python benchmarks/bench_gptq.py --models pi05-small groot-small --calib-steps 8
    python benchmarks/bench_gptq.py --table --models pi05-small groot-small   # rtn / mse / gptq / gptq+awq, W4A8, W4A4
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import qvla_compiler  # noqa: E402
from qvla_compiler.kernels.cpu_gemm import backend as gemm_backend  # noqa: E402
from qvla_compiler.models import build_policy  # noqa: E402
from qvla_compiler.recipes import recipe_from_name  # noqa: E402

DEFAULT_RECIPES = ("w4a8", "w4a8-mse", "w4a8-gptq", "w4a4", "w4a4-gptq", "quantvla-w4a8", "quantvla-w4a8+gptq")
TABLE = tuple(f"quantvla-{r}{m}" for r in ("w4a8", "w4a4") for m in ("", "+mse", "+gptq", "+gptq+awq"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pi05-small", "groot-small"])
    ap.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES))
    ap.add_argument("--calib-steps", type=int, default=8)
    ap.add_argument("--table", action="store_true", help=f"run the issue-20 table: {' '.join(TABLE)}")
    args = ap.parse_args()
    if args.table:
        args.recipes = list(TABLE)
    print(f"# {datetime.date.today()} · {platform.machine()} · CPU {torch.backends.cpu.get_cpu_capability()} "
          f"(GEMM {gemm_backend()}) · "
          f"torch {torch.__version__} · load {os.getloadavg()[0]:.1f} · calib steps {args.calib_steps}")
    print("| model | recipe | action rel-L2 | action SQNR dB | compile s |")
    print("|---|---|---|---|---|")
    for model in args.models:
        for name in args.recipes:
            policy = build_policy(model)
            start = time.perf_counter()
            qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe_from_name(name),
                                        calib_steps=args.calib_steps, progress=False, model_name=model)
            seconds = time.perf_counter() - start
            r = qp.report
            print(f"| {model} | {name} | {r.action_rel_l2:.4f} | {r.action_sqnr_db:.1f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
