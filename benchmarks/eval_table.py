"""Closed-loop success table: float, W8A8, W4A8, W4A4 x layouts `all` and `quantvla`, both tabletop policies.

One command (writes the markdown table, a JSON of every result and a PNG of success against bit width)::

    python benchmarks/eval_table.py --episodes 50 --out benchmarks/RESULTS_tabletop.md

Every configuration runs on the same episodes (seeds 0..episodes-1 of each family) with the same diffusion noise, so
each quantized row is paired with its float row (McNemar p-value). The float rollouts run once per model.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvla_compiler.eval.evaluate import evaluate  # noqa: E402
from qvla_compiler.eval.tabletop import FAMILIES  # noqa: E402

RECIPES = ("w8a8", "w4a8", "w4a4")
LAYOUTS = ("all", "quantvla")
OWN_LAYOUT = "-"  # --layouts value: the recipe's own layout (e.g. omega-w4a4's uniform)
BITS = {"float": "float (fp32)", "w8a8": "W8A8", "w4a8": "W4A8", "w4a4": "W4A4"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(rows: list[dict], episodes: int, families: list[str]) -> str:
    fam_cols = " | ".join(families)
    lines = [
        f"Closed-loop success (%) on the tabletop suite, {episodes} episodes per family "
        f"({episodes * len(families)} per row), seeds 0..{episodes - 1}, identical initial states and diffusion "
        "noise for every row; CI = 95% Wilson interval of the overall rate; p = exact McNemar test against the "
        "float row of the same model; div = mean L2 distance between the float and quantized first action chunk.",
        "",
        f"| model | recipe | layout | success | 95% CI | {fam_cols} | p vs float | div | action SQNR dB | seconds |",
        "|---|---|---|---|---|" + "---|" * len(families) + "---|---|---|---|",
    ]
    for r in rows:
        fam = " | ".join(_pct(r["per_family"][f]["success_q"]) for f in families)
        rep = r.get("report") or {}
        sq = rep.get("action_sqnr_db")
        lo, hi = r["ci_q"]
        pv = "-" if r["recipe"] == "float" else f"{r['p_value']:.3g}"
        sq = "-" if sq is None else f"{sq:.1f}"
        lines.append(
            f"| {r['model']} | {r['recipe']} | {r['layout'] or '-'} | {_pct(r['success_q'])} | "
            f"{_pct(lo)}-{_pct(hi)} | {fam} | {pv} | {r['action_divergence']:.3f} | {sq} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = ["float", *RECIPES]
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        fp = next(r for r in rows if r["model"] == model and r["recipe"] == "float")
        for layout, style in zip(LAYOUTS, ("-o", "--s")):
            pts = [(0, fp["success_q"], fp["ci_q"])]
            for i, rec in enumerate(RECIPES, start=1):
                r = next((r for r in rows if r["model"] == model and r["recipe"] == rec and r["layout"] == layout),
                         None)
                if r is not None:
                    pts.append((i, r["success_q"], r["ci_q"]))
            xs = [p[0] for p in pts]
            ys = [100 * p[1] for p in pts]
            err = [[100 * (p[1] - p[2][0]) for p in pts], [100 * (p[2][1] - p[1]) for p in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=f"{model} / {layout}")
    ax.set_xticks(range(len(order)), [BITS[o] for o in order])
    ax.set_ylabel("closed-loop success (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Tabletop success vs bit width (95% Wilson CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def model_rows(model: str, args, t0: float) -> list[dict]:
    """The float row and every (recipe, layout) row of one model; float rollouts run once and are reused."""
    if args.jobs > 1:
        torch.set_num_threads(1)
    cache: dict = {}
    progress = args.jobs == 1
    r = evaluate(model, "float", episodes=args.episodes, families=args.families, float_cache=cache, progress=progress)
    rows = [r]
    print(f"{model} float: {_pct(r['success_q'])}% ({time.time() - t0:.0f}s)", flush=True)
    for recipe in args.recipes:
        for layout in args.layouts:
            r = evaluate(model, recipe, layout=None if layout == OWN_LAYOUT else layout, episodes=args.episodes,
                         families=args.families,
                         calib_steps=args.calib_steps, float_cache=cache, progress=progress)
            rows.append(r)
            print(f"{model} {recipe}/{layout}: {_pct(r['success_q'])}% (float {_pct(r['success_fp'])}%, "
                  f"p={r['p_value']:.3g}, div={r['action_divergence']:.3f}; {time.time() - t0:.0f}s)", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["pi05-tabletop", "groot-tabletop"])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES),
                    help="presets, optionally with +options (e.g. w4a4+svd-hadamard+per_step)")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS),
                    help=f"layouts to cross with every recipe; {OWN_LAYOUT!r}: each recipe's own")
    ap.add_argument("--episodes", type=int, default=50, help="episodes per family")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--calib-steps", type=int, default=8)
    ap.add_argument("--out", default="benchmarks/RESULTS_tabletop.md")
    ap.add_argument("--png", default="benchmarks/tabletop_success_vs_bits.png")
    ap.add_argument("--json", default="benchmarks/tabletop_results.json")
    ap.add_argument("--jobs", type=int, default=1, help="models evaluated in parallel processes (one thread each)")
    args = ap.parse_args(argv)
    rows: list[dict] = []
    t0 = time.time()

    def flush() -> None:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
        md = markdown(rows, args.episodes, args.families)
        Path(args.out).write_text("# Tabletop closed-loop results\n\nCommand: `python benchmarks/eval_table.py "
                                  + " ".join(sys.argv[1:]) + "`\n\n" + md)

    jobs = max(1, min(args.jobs, len(args.models)))
    if jobs == 1:
        for model in args.models:
            rows += model_rows(model, args, t0)
            flush()
    else:  # one process per model, one thread each: the rows of a model never depend on another model's
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for model_result in pool.map(model_rows, args.models, [args] * len(args.models), [t0] * len(args.models)):
                rows += model_result
                flush()
    try:
        plot(rows, Path(args.png))
    except ImportError:
        print("matplotlib missing: pip install matplotlib (table written, plot skipped)", flush=True)
    print(markdown(rows, args.episodes, args.families))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
