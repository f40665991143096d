"""Action SQNR of rotation / smoothing methods at W8A8, W4A8, W4A4 on policies with injected outliers.

    OMP_NUM_THREADS=1 python benchmarks/bench_rotations.py [--models pi05-tiny groot-tiny] [--calib-steps 4]
        [--methods none hadamard quarot]

Prints one markdown table: rows = (model, method), columns = bit widths, cells = action SQNR in dB of the
quantized program against the float policy (same observation and noise; layout quantvla, dynamic per-token
activations, int4 weights in groups of 128). Every method quantizes the same linears; only the input transform differs.
"""
from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

import qvla_compiler
from qvla_compiler.models import build_policy
from qvla_compiler.models.outliers import inject_outliers
from qvla_compiler.recipes import RECIPES

METHODS = {"none": dict(), "smoothquant": dict(smooth="smoothquant"), "hadamard": dict(rotation="hadamard"),
           "quarot": dict(rotation="quarot"), "duquant": dict(rotation="duquant", smooth_alpha=0.6)}
BITS = ("w8a8", "w4a8", "w4a4")


def measure(model: str, bits: str, method: str, outliers: bool, calib_steps: int) -> float:
    policy = build_policy(model)
    if outliers:
        inject_outliers(policy)
    recipe = RECIPES[bits].with_(name=f"{bits}-{method}", **METHODS[method])
    qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe, calib_steps=calib_steps,
                                progress=False, model_name=model)
    return qp.report.action_sqnr_db


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pi05-tiny", "groot-tiny"])
    parser.add_argument("--calib-steps", type=int, default=4)
    parser.add_argument("--no-outliers", action="store_true")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    print(f"outliers injected: {not args.no_outliers}; calibration batches: {args.calib_steps}; torch "
          f"{torch.__version__}; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads\n")
    print("| model | method | " + " | ".join(b.upper() for b in BITS) + " |")
    print("|---|---|" + "---:|" * len(BITS))
    for model in args.models:
        for method in args.methods:
            cells = [f"{measure(model, b, method, not args.no_outliers, args.calib_steps):.2f}" for b in BITS]
            print(f"| {model} | {method} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
