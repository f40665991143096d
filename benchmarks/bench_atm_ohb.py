"""ATM / OHB on the trained tabletop policies: closed-loop success, action divergence, and per-layer drift ratios.

One command (writes the markdown, a JSON of every result and a PNG of the per-layer ratios)::

    python benchmarks/bench_atm_ohb.py --episodes 5 --out benchmarks/RESULTS_atm_ohb.md

Grid: models x {W4A8, W4A4} x layouts {all, quantvla} x {none, ATM, OHB, ATM+OHB}; plain per-group int4 weights,
dynamic per-token activations (no rotation), calibrated on expert observations (evaluate()'s default). Every row runs
the same episodes and diffusion noise as the float policy (paired). Diagnostics: for each (model, bits, layout), one
extra quantization with ATM+OHB gives the teacher/student statistics; σ_S/σ_T per head (mean over heads per layer) and
RMS_S/RMS_T per layer are reported before the fold (from the calibration record) and after it (re-observed on the
folded program, same calibration inputs and noise).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qvla_compiler  # noqa: E402
from qvla_compiler.calibration import collect_batches, observe_program  # noqa: E402
from qvla_compiler.eval.evaluate import calibration_observations, evaluate  # noqa: E402
from qvla_compiler.models import build_policy  # noqa: E402
from qvla_compiler.program import with_noise  # noqa: E402
from qvla_compiler.recipes import QuantRecipe  # noqa: E402

BITS = {"W4A8": (4, 8), "W4A4": (4, 4)}
VARIANTS = {"none": (False, False), "ATM": (True, False), "OHB": (False, True), "ATM+OHB": (True, True)}


def recipe(bits: str, variant: str) -> QuantRecipe:
    w, a = BITS[bits]
    atm, ohb = VARIANTS[variant]
    return QuantRecipe(f"{bits.lower()}-{variant.lower().replace('+', '-')}", w_bits=w, a_bits=a, atm=atm, ohb=ohb)


def diagnostics(policy, model: str, bits: str, layout: str, calib_steps: int) -> list[dict]:
    """Per attention layer of the action head: logit-std and energy ratios (student/teacher) before/after the fold."""
    calib = calibration_observations(policy, calib_steps)
    qp = qvla_compiler.quantize(policy, calib[0], calib, recipe=recipe(bits, "ATM+OHB"), layout=layout,
                                calib_steps=calib_steps, progress=False, model_name=model)
    noise = policy.example_noise(1)
    batches = collect_batches(with_noise(calib, tuple(noise.shape[1:]), 0))  # quantize()'s inputs and noise
    after = observe_program(qp.program, batches)["denoise"]
    rows = []
    for r in qp.report.attention_scales["graphs"]["denoise"]:
        t_std, s_std, a_std = r["logit_std_teacher"], r["logit_std_student"], after[r["block"]].logit_std
        rows.append({"block": r["block"], "alpha": r["alpha"], "beta": r["beta"],
                     "std_ratio_before": [s / t for s, t in zip(s_std, t_std)],
                     "std_ratio_after": [s / t for s, t in zip(a_std, t_std)],
                     "rms_ratio_before": r["rms_student"] / r["rms_teacher"],
                     "rms_ratio_after": after[r["block"]].energy_rms / r["rms_teacher"]})
    return rows


def _mean(xs):
    return sum(xs) / len(xs)


def markdown(results: list[dict], diags: dict, args, seconds: float, checkpoints: dict) -> str:
    lines = [f"Command: `python benchmarks/bench_atm_ohb.py --episodes {args.episodes} --calib-steps "
             f"{args.calib_steps} --models {' '.join(args.models)} --jobs {args.jobs}`  ",
             f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {platform.machine()} CPU, "
             f"{platform.system()}, torch {__import__('torch').__version__}; {seconds / 60:.0f} min.  ",
             f"{args.episodes} episodes per family x 3 families = {3 * args.episodes} paired episodes per row.  ",
             f"Checkpoints (metadata): {json.dumps(checkpoints)}",
             "", "## Closed loop", "",
             "| model | bits | layout | variant | success float | success quant | p (McNemar) | action div |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['bits']} | {r['layout']} | {r['variant']} | {100 * r['success_fp']:.1f} | "
                     f"{100 * r['success_q']:.1f} | {r['p_value']:.3g} | {r['action_divergence']:.4f} |")
    lines += ["", "## Per-layer drift (student / teacher; 1 = no drift)", "",
              "| model | bits | layout | block | logit-std ratio before (mean, min..max over heads) | after | "
              "α (≠1) | RMS ratio before | after | β |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (model, bits, layout), rows in diags.items():
        for d in rows:
            b, a = d["std_ratio_before"], d["std_ratio_after"]
            moved = [f"{x:.3f}" for x in d["alpha"] if x != 1.0]
            lines.append(f"| {model} | {bits} | {layout} | {d['block']} | {_mean(b):.3f} ({min(b):.3f}..{max(b):.3f}) "
                         f"| {_mean(a):.3f} ({min(a):.3f}..{max(a):.3f}) | {', '.join(moved) or '-'} | "
                         f"{d['rms_ratio_before']:.3f} | {d['rms_ratio_after']:.3f} | {d['beta']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(diags: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(diags), figsize=(3.2 * len(diags), 5.5), squeeze=False, sharey="row")
    for col, ((model, bits, layout), rows) in enumerate(diags.items()):
        blocks = [d["block"] for d in rows]
        for row, (key, label) in enumerate((("std_ratio", "logit std S/T"), ("rms_ratio", "o_proj RMS S/T"))):
            ax = axes[row][col]
            for when, style in (("before", "o-"), ("after", "s--")):
                vals = [_mean(d[f"{key}_{when}"]) if row == 0 else d[f"{key}_{when}"] for d in rows]
                ax.plot(blocks, vals, style, label=when)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_title(f"{model.split('-')[0]} {bits} {layout}", fontsize=8)
            ax.set_xlabel("action-head attention layer", fontsize=7)
            if col == 0:
                ax.set_ylabel(label)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def model_grid(model: str, args) -> tuple[list[dict], dict, object]:
    """Every (bits, layout, variant) row and the drift diagnostics of one model."""
    if args.jobs > 1:
        torch.set_num_threads(1)
    cache: dict = {}
    results, diags = [], {}
    policy = build_policy(model)  # loaded once: every row of this model uses the very same weights
    meta = getattr(policy, "checkpoint_metadata", None)
    for bits in BITS:
        for layout in ("all", "quantvla"):
            diags[(model, bits, layout)] = diagnostics(policy, model, bits, layout, args.calib_steps)
            for variant in VARIANTS:
                r = evaluate(model, recipe(bits, variant), layout=layout, episodes=args.episodes,
                             calib_steps=args.calib_steps, progress=False, float_cache=cache, policy=policy)
                results.append({"model": model, "bits": bits, "layout": layout, "variant": variant,
                                **{k: r[k] for k in ("success_fp", "success_q", "p_value", "action_divergence")}})
                print(json.dumps(results[-1]), flush=True)
    return results, diags, dict(meta) if meta else "none (random init)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["pi05-tabletop", "groot-tabletop"])
    ap.add_argument("--episodes", type=int, default=5, help="per family")
    ap.add_argument("--calib-steps", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/RESULTS_atm_ohb.md")
    ap.add_argument("--jobs", type=int, default=1, help="models run in parallel processes (one thread each)")
    args = ap.parse_args()
    t0, results, diags, checkpoints = time.time(), [], {}, {}
    jobs = max(1, min(args.jobs, len(args.models)))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for model, (rows, model_diags, meta) in zip(args.models, pool.map(model_grid, args.models,
                                                                          [args] * len(args.models))):
            results += rows
            diags.update(model_diags)
            checkpoints[model] = meta
    out = Path(args.out)
    out.write_text(markdown(results, diags, args, time.time() - t0, checkpoints))
    out.with_suffix(".json").write_text(json.dumps(
        {"checkpoints": checkpoints, "results": results, "diagnostics": {"/".join(k): v for k, v in diags.items()}}, indent=1))
    plot(diags, out.with_suffix(".png"))
    print(f"wrote {out}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
