"""Quantize tiny random-weight lerobot policies through qvla_compiler.integrations.lerobot and print one table row each.

    python scripts/bench_lerobot.py                      # pi05, pi0, smolvla × w8a8, w4a8 (quantvla layout)
    python scripts/bench_lerobot.py --kinds pi05 --recipes w8a8 --json
    PYTHONPATH=<lerobot 0.4.4 folder> python scripts/bench_lerobot.py --kinds groot groot-bf16   # GR00T N1.5

Columns: integer / float linears (call sites, as report.summary() counts them), bf16 → quantized bytes of the
integer linears, action rel-L2 and SQNR against lerobot's own float sampler on the same noise, quantize wall time, and
the time of one action chunk (batch 2) for lerobot's eager sampler and for the quantized program.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import qvla_compiler
from qvla_compiler.integrations.lerobot import wrap
from qvla_compiler.integrations.lerobot_tiny import KINDS, build_tiny

OBS = ("images", "tokens", "token_mask", "state")


def _time(fn, repeat: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def _build(kind: str):
    if kind in ("groot", "groot-bf16"):  # groot-bf16: use_bf16=True, GR00T's default (bf16 autocast)
        from qvla_compiler.integrations.lerobot_groot import build_tiny_groot

        return build_tiny_groot(use_bf16=kind == "groot-bf16")
    return build_tiny(kind)


def bench(kind: str, recipe: str, layout: str, calib: int) -> dict:
    w = wrap(_build(kind))
    obs = w.example_inputs()
    start = time.perf_counter()
    qp = qvla_compiler.quantize(w, obs, w.calibration_batches(calib, seed=1), recipe=w.recipe(recipe, layout),
                                progress=False)
    wall = time.perf_counter() - start
    noise = w.example_noise(2)
    args = (*(obs[k] for k in OBS), noise)
    program = qp.module()
    with torch.no_grad():
        eager_s = _time(lambda: w.sample_actions(**obs, noise=noise))
        program_s = _time(lambda: program(*args))
    s = qp.report.summary()
    return {"model": f"lerobot-{kind}-tiny", "params": sum(p.numel() for p in w.parameters()), "recipe": recipe,
            "layout": layout, "int_linears": s["int_linears"], "float_linears": s["float_linears"],
            "regions": s["regions"], "bytes_bf16": s["bytes_bf16"], "bytes_quant": s["bytes_quant"],
            "action_rel_l2": s["action_rel_l2"], "action_sqnr_db": s["action_sqnr_db"],
            "quantize_s": round(wall, 1), "eager_chunk_ms": round(eager_s * 1e3, 1),
            "program_chunk_ms": round(program_s * 1e3, 1), "torch_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=(*KINDS, "groot", "groot-bf16"),
                    help="groot / groot-bf16 need lerobot 0.4.4 on PYTHONPATH (scripts/install_lerobot_groot.sh)")
    ap.add_argument("--recipes", nargs="+", default=["w8a8", "w4a8"])
    ap.add_argument("--layout", default="quantvla")
    ap.add_argument("--calib", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    a = ap.parse_args()
    if not a.json:
        print("| model | params | recipe | int / float linears | bytes bf16 → quant | action rel-L2 | SQNR dB | "
              "quantize s | chunk ms eager / program |")
        print("|---|---|---|---|---|---|---|---|---|")
    for kind in a.kinds:
        for recipe in a.recipes:
            r = bench(kind, recipe, a.layout, a.calib)
            if a.json:
                print(json.dumps(r), flush=True)
            else:
                print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {recipe} | {r['int_linears']} / "
                      f"{r['float_linears']} | {r['bytes_bf16']} → {r['bytes_quant']} | {r['action_rel_l2']:.4f} | "
                      f"{r['action_sqnr_db']:.1f} | {r['quantize_s']} | {r['eager_chunk_ms']} / "
                      f"{r['program_chunk_ms']} |", flush=True)


if __name__ == "__main__":
    main()
