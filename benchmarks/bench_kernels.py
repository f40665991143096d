"""GPU benchmark of the qvla Triton kernels on the linear shapes of full-size pi0.5 and GR00T N1.5.

For every M (tokens) x (K -> N) shape: median time (triton.testing.do_bench) of bf16 torch.matmul, torch._int_mm
(where cuBLASLt accepts the shape: M > 16, K % 8 == 0, N % 8 == 0; int32 output, no scales) and each qvla path
*including* its activation quantization: W8A8, W4A8 (g128), W4A4 (int4 values in int8), W4A4 with packed activations.
Prints one table of speedups over bf16 (> 1 is faster). Weights are rotated over enough copies to exceed L2 twice, so
the numbers are HBM-bound like a real forward pass, not L2 hits. The first call of each shape autotunes (slow).

    python benchmarks/bench_kernels.py [--m 1 16 800] [--shapes lm] [--json out.json]

Without CUDA the script says so and exits 0.
"""
import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

_M_VALUES = (1, 8, 16, 32, 64, 128, 256, 800)
# (family, name, K = in_features, N = out_features)
_SHAPES = (
    ("pi05_lm", "attn 2048->2048", 2048, 2048),
    ("pi05_lm", "kv 2048->256", 2048, 256),
    ("pi05_lm", "mlp up 2048->16384", 2048, 16384),
    ("pi05_lm", "mlp down 16384->2048", 16384, 2048),
    ("pi05_expert", "1024->2048", 1024, 2048),
    ("pi05_expert", "2048->1024", 2048, 1024),
    ("pi05_expert", "mlp up 1024->4096", 1024, 4096),
    ("pi05_expert", "mlp down 4096->1024", 4096, 1024),
    ("gr00t_n15", "2048->1024", 2048, 1024),
    ("gr00t_n15", "2048->6144", 2048, 6144),
    ("gr00t_n15", "6144->2048", 6144, 2048),
    ("gr00t_n15", "1536->6144", 1536, 6144),
    ("gr00t_n15", "6144->1536", 6144, 1536),
)
_GROUP_SIZE = 128
_PATHS = ("int_mm", "w8a8", "w4a8", "w4a4", "w4a4_packed")


def _copies(weight_bytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    return max(1, min(32, -(-2 * l2 // max(weight_bytes, 1))))


def _rotating(make, count):
    """A zero-argument callable that cycles over `count` independently allocated operand sets."""
    sets = itertools.cycle([make() for _ in range(count)])
    return lambda: next(sets)


def _weights(k, n):
    """Rotating weight sets for one shape (bf16, int8 + per-channel scale, packed int4 + group scales)."""
    dev, groups = "cuda", -(-k // _GROUP_SIZE)
    count = _copies(n * k * 2)
    bf16 = _rotating(lambda: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02, count)
    w8 = _rotating(lambda: (torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8),
                            torch.rand(n, device=dev) * 1e-3), count)
    w4 = _rotating(lambda: (torch.randint(-128, 128, (n, -(-k // 2)), device=dev, dtype=torch.int8),
                            torch.rand(n, groups, device=dev) * 1e-2), count)
    return bf16, w8, w4


def _time(fn):
    from triton.testing import do_bench

    fn()  # compile + autotune outside the measurement
    torch.cuda.synchronize()
    return do_bench(fn, return_mode="median")


def _bench_shape(m, k, n, weights, kernels):
    qa, k8, k4 = kernels
    bf16_w, w8, w4 = weights
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    times = {"bf16": _time(lambda: torch.matmul(x, bf16_w().t()))}

    if m > 16 and k % 8 == 0 and n % 8 == 0:  # cuBLASLt _int_mm constraints
        xq8 = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8)
        times["int_mm"] = _time(lambda: torch._int_mm(xq8, w8()[0].t()))

    def w8a8():
        xq, xs = qa.quantize_act(x, 8)
        w, ws = w8()
        return k8.int8_linear(xq, xs, w, ws, None, torch.bfloat16)

    def w4_path(bits):
        def run():
            xq, xs = qa.quantize_act(x, bits)
            w, ws = w4()
            return k4.int4_linear(xq, xs, w, ws, None, _GROUP_SIZE, torch.bfloat16)
        return run

    def w4a4_packed():
        xp, xs = qa.quantize_act_packed_int4(x)
        w, ws = w4()
        return k4.int4_linear_packed_act(xp, xs, w, ws, None, _GROUP_SIZE, torch.bfloat16, k=k)

    for name, fn in (("w8a8", w8a8), ("w4a8", w4_path(8)), ("w4a4", w4_path(4)), ("w4a4_packed", w4a4_packed)):
        times[name] = _time(fn)
    return times


def _format_table(rows):
    head = f"{'family':<12} {'shape':<22} {'M':>4} {'bf16 us':>9} " + " ".join(f"{p:>11}" for p in _PATHS)
    lines = [head, "-" * len(head)]
    for r in rows:
        ratios = []
        for p in _PATHS:
            t = r["ms"].get(p)
            ratios.append(f"{r['ms']['bf16'] / t:>10.2f}x" if t else f"{'n/a':>11}")
        row = f"{r['family']:<12} {r['shape']:<22} {r['M']:>4} {r['ms']['bf16'] * 1e3:>9.1f} "
        lines.append(row + " ".join(ratios))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=list(_M_VALUES), help="token counts (rows of x)")
    parser.add_argument("--shapes", nargs="+", default=None,
                        help="families to run (pi05_lm, pi05_expert, gr00t_n15); default all")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="also write the raw times (ms) as JSON to PATH ('-' or no value: stdout)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels: CUDA is not available; these are GPU benchmarks, nothing to measure here.")
        return 0
    from qvla_compiler.kernels import triton_int4_linear as k4
    from qvla_compiler.kernels import triton_int8_linear as k8
    from qvla_compiler.kernels import triton_quantize_act as qa

    shapes = [s for s in _SHAPES if args.shapes is None or s[0] in args.shapes]
    print(f"device: {torch.cuda.get_device_name(0)}; speedup over bf16 torch.matmul (qvla columns include "
          f"activation quantization; int_mm is the bare cuBLASLt int8 GEMM, int32 out); W4 group size {_GROUP_SIZE}")
    rows = []
    for family, name, k, n in shapes:
        weights = _weights(k, n)
        for m in args.m:
            ms = _bench_shape(m, k, n, weights, (qa, k8, k4))
            rows.append({"family": family, "shape": name, "M": m, "K": k, "N": n, "ms": ms})
            print(f"  done {family} {name} M={m}", file=sys.stderr, flush=True)
    print(_format_table(rows))
    if args.json == "-":
        print(json.dumps(rows, indent=1))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
