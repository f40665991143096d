"""CPU latency of the small reference policies: fp32 eager vs bf16 eager vs qvla W8A8 / W4A8 integer programs.

Prints medians and ratios to fp32 measured in this one process, plus the memory table. Usage:
    python benchmarks/bench_cpu.py [--models pi05-small groot-small] [--batch 1] [--repeats 20] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings

import torch

import qvla_compiler
from qvla_compiler.models import build_policy

warnings.filterwarnings("ignore")


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _autocast(fn):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return fn()
    return run


def bench_model(name: str, batch: int, repeats: int) -> dict:
    policy = build_policy(name)
    obs = policy.example_inputs(batch)
    noise = policy.example_noise(batch)
    t = torch.full((batch,), float(policy.schedule.timesteps[0]))
    with torch.no_grad():
        prefix = policy.embed_prefix(**obs)
    rows = {
        "fp32 eager": (lambda: policy.embed_prefix(**obs), lambda: policy.denoise_step(prefix, noise, t)),
        # bf16 through autocast: matmuls and linears in bf16, the policies' fp32 islands (softmax, time) kept
        "bf16 eager": (_autocast(lambda: policy.embed_prefix(**obs)),
                       _autocast(lambda: policy.denoise_step(prefix, noise, t))),
    }
    memory = {}
    for recipe in ("w8a8", "w4a8"):
        qp = qvla_compiler.quantize(policy, obs if batch > 1 else policy.example_inputs(2), recipe=recipe,
                                    progress=False, model_name=name)
        g = qp.program.graphs
        rows[f"qvla {recipe.upper()}"] = (lambda g=g: g["prefix"](*obs.values()),
                                          lambda g=g: g["denoise"](prefix, noise, t))
        memory[recipe] = {k: qp.report.summary()[k] for k in ("bytes_bf16", "bytes_quant", "memory_saving",
                                                              "policy_bytes_bf16", "policy_bytes_quant",
                                                              "action_rel_l2", "action_sqnr_db")}
    timings = {label: {"prefix_ms": median_ms(p, max(3, repeats // 4)), "denoise_ms": median_ms(d, repeats)}
               for label, (p, d) in rows.items()}
    base = timings["fp32 eager"]
    for row in timings.values():
        row["prefix_ratio"] = row["prefix_ms"] / base["prefix_ms"]
        row["denoise_ratio"] = row["denoise_ms"] / base["denoise_ms"]
    return {"model": name, "batch": batch, "timings": timings, "memory": memory}


def bench_rotation_ops(repeats: int) -> list[dict]:
    """Per-call cost of the online rotation ops on [50, width] activations, next to a width x width fp32 linear."""
    from qvla_compiler.quant.hadamard import hadamard_base, hadamard_factors

    rows = []
    for width in (384, 1024, 1536, 4096):
        x, w = torch.randn(50, width), torch.randn(width, width)
        m, _ = hadamard_factors(width)
        had = hadamard_base(m).float() if m > 1 else None
        block = 128 if width % 128 == 0 else width
        rot = torch.linalg.qr(torch.randn(width // block, block, block))[0]
        perm = torch.randperm(width)
        rows.append({"width": width,
                     "hadamard_ms": median_ms(lambda: torch.ops.qvla.hadamard(x, had, width ** -0.5, 1), repeats),
                     "block_rotate_ms": median_ms(lambda: torch.ops.qvla.block_rotate(x, rot, perm, rot), repeats),
                     "linear_ms": median_ms(lambda: x @ w.t(), repeats)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pi05-small", "groot-small"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    results = []
    for model in args.models:
        results.append(bench_model(model, args.batch, args.repeats))
        if not args.json:
            print_markdown(results[-1], machine)
    rotations = bench_rotation_ops(args.repeats)
    if args.json:
        print(json.dumps({"machine": machine, "results": results, "rotation_ops": rotations}))
        return
    print("\n### online rotation ops, x = [50, width] fp32 (medians)\n")
    print("| width | qvla::hadamard ms | qvla::block_rotate (rot+perm+rot, B=128) ms | fp32 width×width linear ms |")
    print("|---|---|---|---|")
    for r in rotations:
        print(f"| {r['width']} | {r['hadamard_ms']:.3f} | {r['block_rotate_ms']:.3f} | {r['linear_ms']:.3f} |")


def print_markdown(res: dict, machine: dict) -> None:
    print(f"machine: {machine}, load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n### {res['model']} (batch {res['batch']}; medians, ratio = time / fp32 eager time)\n")
    print("| variant | prefix ms | prefix ratio | denoise step ms | denoise ratio |")
    print("|---|---|---|---|---|")
    for label, r in res["timings"].items():
        print(f"| {label} | {r['prefix_ms']:.1f} | {r['prefix_ratio']:.2f}× | {r['denoise_ms']:.2f} | "
              f"{r['denoise_ratio']:.2f}× |")
    print("\n| recipe | quantized linears bf16 → int | saving | whole policy bf16 → int | action rel L2 | SQNR dB |")
    print("|---|---|---|---|---|---|")
    for recipe, m in res["memory"].items():
        print(f"| {recipe} | {m['bytes_bf16'] / 2**20:.2f} → {m['bytes_quant'] / 2**20:.2f} MiB | "
              f"{m['memory_saving']:.1%} | {m['policy_bytes_bf16'] / 2**20:.2f} → "
              f"{m['policy_bytes_quant'] / 2**20:.2f} MiB | {m['action_rel_l2']:.4f} | {m['action_sqnr_db']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
