"""Beyond QuantVLA (issue 24): uniform W4A4 with per-step activation scales, against the QuantVLA layout.

For each model × variant: average bits per linear weight (float linears count as bf16, 16), quantized bytes of the
whole policy's linears, action rel-L2 / SQNR of the quantized sampler against float (same inputs and noise as
`quantize` measures) and the compile time. Each variant is a preset with fields replaced, so every row is one recipe
a user can ask for with `qvla quantize --recipe <preset> --layout ... ` or QuantRecipe.with_(...).

    OMP_NUM_THREADS=1 python benchmarks/bench_beyond.py --models pi05-small groot-small --calib-steps 8
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
from qvla_compiler.recipes import LAYOUTS, RECIPES  # noqa: E402

W4A4 = RECIPES["w4a4"]
VARIANTS = {  # name → recipe; the ablation walks from QuantVLA to uniform W4A4 one change at a time
    "quantvla-w4a4 (DuQuant, ATM/OHB, dynamic)": RECIPES["quantvla-w4a4"],
    "uniform w4a4 dynamic": W4A4.with_(layout="uniform"),
    "uniform w4a4 static": W4A4.with_(layout="uniform", act_mode="static"),
    "uniform w4a4 per_step": W4A4.with_(layout="uniform", act_mode="per_step"),
    "uniform w4a4 hadamard dynamic": W4A4.with_(layout="uniform", rotation="hadamard"),
    "uniform w4a4 hadamard static": W4A4.with_(layout="uniform", rotation="hadamard", act_mode="static"),
    "uniform w4a4 hadamard per_step": W4A4.with_(layout="uniform", rotation="hadamard", act_mode="per_step"),
    "uniform w4a4 svd-hadamard dynamic": W4A4.with_(layout="uniform", rotation="svd-hadamard"),
    "uniform w4a4 svd-hadamard per_step": W4A4.with_(layout="uniform", rotation="svd-hadamard", act_mode="per_step"),
    "uniform w4a4 svd-hadamard per_step gptq": W4A4.with_(layout="uniform", rotation="svd-hadamard",
                                                          act_mode="per_step", weight_method="gptq"),
    "quantvla-layout w8a8 static": RECIPES["w8a8-static"],
    "quantvla-layout w8a8 per_step": RECIPES["w8a8-perstep"],
    # mixed precision against the fixed QuantVLA layout at the same bits (RTN weights, dynamic activations, both)
    "quantvla-layout w4a8": RECIPES["w4a8"],
    "auto w4a8 @ quantvla-layout bits": None,  # bpw = the row above's bits over the uniform layout's linears
    "auto w4a8 bpw 4.5": RECIPES["w4a8"].with_(layout="auto", bpw=4.5),
    "uniform w4a8": RECIPES["w4a8"].with_(layout="uniform"),
    # below 4 bits: 3-bit weights (bit-planes) in the fixed layout, and the allocation over 2 / 3 / 4 / 8 / float
    "quantvla-layout w3a8": RECIPES["w3a8"],
    "quantvla-layout w3a8 gptq": RECIPES["w3a8-gptq"],
    "auto w4a8 bpw 4.0": RECIPES["w4a8"].with_(layout="auto", bpw=4.0),
    "auto w4a8 bpw 3.0": RECIPES["w4a8"].with_(layout="auto", bpw=3.0),
    "auto w4a8 bpw 3.0 gptq": RECIPES["w4a8"].with_(layout="auto", bpw=3.0, weight_method="gptq"),
    "auto w4a8 bpw 4.0 gptq": RECIPES["w4a8"].with_(layout="auto", bpw=4.0, weight_method="gptq"),
    "uniform w4a8 gptq": RECIPES["w4a8"].with_(layout="uniform", weight_method="gptq"),
    # the preset, and its 4-bit weights with the backbone's activations at 8 bits (RESULTS §21)
    "omega-w4a4": RECIPES["omega-w4a4"],
    "omega-w4a4 backbone-a8": RECIPES["omega-w4a4"].with_(backbone_a_bits=8),
}
CANDIDATES = {(region.value, role.value) for region, role in LAYOUTS["uniform"]}


def bits_per_weight(report, only=None) -> float:
    """Average weight bits over the policy's linears (or those whose (region, role) is in `only`); float = 16."""
    rows = [r for r in report.linears if r.call_site == 0 and (only is None or (r.region, r.role) in only)]
    bits = sum((int(r.bits[1:r.bits.index("A")]) if r.bits != "float" else 16) * r.params for r in rows)
    return bits / sum(r.params for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pi05-small", "groot-small"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), help="names from VARIANTS (quote them)")
    ap.add_argument("--calib-steps", type=int, default=8)
    args = ap.parse_args()
    print(f"# {datetime.date.today()} · {platform.machine()} · CPU {torch.backends.cpu.get_cpu_capability()} "
          f"(GEMM {gemm_backend()}) · torch {torch.__version__} · threads {torch.get_num_threads()} · "
          f"load {os.getloadavg()[0]:.1f} · calib steps {args.calib_steps}")
    print("| model | variant | int linears | bits/weight (all linears) | bits/weight (uniform's linears) | linear MiB | "
          "action rel-L2 | action SQNR dB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        quantvla_bits = None
        for name in args.variants:
            recipe = VARIANTS[name]
            if recipe is None:
                if quantvla_bits is None:
                    continue
                recipe = RECIPES["w4a8"].with_(layout="auto", bpw=quantvla_bits)
            policy = build_policy(model)
            start = time.perf_counter()
            qp = qvla_compiler.quantize(policy, policy.example_inputs(), recipe=recipe,
                                        calib_steps=args.calib_steps, progress=False, model_name=model)
            seconds = time.perf_counter() - start
            r = qp.report
            if name == "quantvla-layout w4a8":
                quantvla_bits = bits_per_weight(r, CANDIDATES)
            print(f"| {model} | {name} | {r.int_linears} | {bits_per_weight(r):.2f} | "
                  f"{bits_per_weight(r, CANDIDATES):.2f} | "
                  f"{r.policy_bytes_quant / 2**20:.2f} | {r.action_rel_l2:.4f} | {r.action_sqnr_db:.1f} | "
                  f"{seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
