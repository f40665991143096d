"""`--layout auto`: the measured action sensitivities against their first-order estimate (`+gradient`), RESULTS §20.

Per model: (1) both sensitivity tables on the first calibration batch (the calibration's own), timed, with the
Spearman rank correlation per width and the spread of estimate / measurement; (2) per recipe, the whole compile
and the action rel-L2 on 16 held-out observations (seed 777), measured and with "+gradient".

    OMP_NUM_THREADS=1 python benchmarks/bench_sensitivity.py --models pi05-small groot-small \
        --recipes "w4a8+bpw4.0" "w4a8+bpw4.0+gptq"
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import qvla_compiler  # noqa: E402
from qvla_compiler import calibration as cal  # noqa: E402
from qvla_compiler.export import capture_policy  # noqa: E402
from qvla_compiler.models import build_policy  # noqa: E402
from qvla_compiler.passes import apply_layout, assign_regions, classify_linears  # noqa: E402
from qvla_compiler.program import Program, with_noise  # noqa: E402
from qvla_compiler.recipes import recipe_from_name  # noqa: E402


def compare_tables(model: str, recipe, calib_steps: int) -> None:
    policy = build_policy(model)
    obs, noise = policy.example_inputs(), policy.example_noise()
    program = Program(capture_policy(policy, obs, noise), policy.schedule)
    for gm in program.graphs.values():
        apply_layout(assign_regions(classify_linears(gm)), recipe)
    batch = next(with_noise(policy.calibration_batches(calib_steps, seed=0), tuple(noise.shape[1:]), 0))
    start = time.perf_counter()
    measured, _ = cal.measure_weight_sensitivity(program, recipe, batch, progress=False)
    mid = time.perf_counter()
    estimated, _ = cal.estimate_weight_sensitivity(program, recipe, batch, progress=False)
    end = time.perf_counter()
    print(f"\n{model} (RTN widths, {len(measured)} linears): measured {mid - start:.0f} s, estimated {end - mid:.0f} s")
    print("| width | Spearman | estimate / measured: median [10%–90%] |\n|---|---|---|")
    paths = sorted(measured)
    for bits in next(iter(measured.values())):
        m = np.array([measured[p][bits] for p in paths])
        e = np.array([estimated[p][bits] for p in paths])
        ratio = e[m > 0] / m[m > 0]
        print(f"| {bits} | {spearmanr(m, e).correlation:.3f} | {np.median(ratio):.2f} "
              f"[{np.percentile(ratio, 10):.2f}–{np.percentile(ratio, 90):.2f}] |")


def compile_rows(model: str, names: list[str], calib_steps: int) -> None:
    print(f"\n| {model} recipe | sensitivity | action rel-L2 (held out) | compile s |\n|---|---|---|---|")
    for name in names:
        for suffix, label in (("", "measured"), ("+gradient", "gradient")):
            policy = build_policy(model)
            held_out = policy._observation(torch.Generator().manual_seed(777), 16)
            start = time.perf_counter()
            qp = qvla_compiler.quantize(policy, held_out, recipe=name + suffix, calib_steps=calib_steps,
                                        progress=False, model_name=model)
            print(f"| {name} | {label} | {qp.report.action_rel_l2:.4f} | {time.perf_counter() - start:.0f} |",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pi05-small", "groot-small"])
    ap.add_argument("--recipes", nargs="+", default=["w4a8+bpw4.0", "w4a8+bpw4.0+gptq"])
    ap.add_argument("--calib-steps", type=int, default=8)
    args = ap.parse_args()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · CPU "
          f"{torch.backends.cpu.get_cpu_capability()} · torch {torch.__version__} · threads "
          f"{torch.get_num_threads()} · load {os.getloadavg()[0]:.1f}")
    for model in args.models:
        compare_tables(model, recipe_from_name("w4a8+bpw4.0"), args.calib_steps)
        compile_rows(model, args.recipes, args.calib_steps)


if __name__ == "__main__":
    main()
