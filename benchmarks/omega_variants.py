"""omega-w4a4 with one field changed, in closed loop on a tabletop policy (benchmarks/RESULTS.md §13).

    OMP_NUM_THREADS=1 python benchmarks/omega_variants.py groot-tabletop block64 alpha0.3
    OMP_NUM_THREADS=1 python benchmarks/omega_variants.py pi05-tabletop base block256 --seed 1000   # held-out seeds
    OMP_NUM_THREADS=1 python benchmarks/omega_variants.py groot-tabletop base w8a4 w4a8 --seed 10000 --episodes 1200

Prints one JSON line per variant: success of float and quantized on the same 600 episodes, McNemar p, divergence.
`--seed S` moves the episodes to seeds S..S+199 of each family: choose a variant there, then report it on the
evaluation seeds 0..199 (RESULTS §13's), so the choice is not tuned on the episodes it is reported on.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from qvla_compiler.eval.evaluate import evaluate  # noqa: E402
from qvla_compiler.recipes import RECIPES  # noqa: E402

VARIANTS = {  # name → the one field changed
    "base": {},
    "block64": dict(rotation_block=64),
    "block256": dict(rotation_block=256),
    "alpha0.3": dict(smooth_alpha=0.3),
    "alpha0.7": dict(smooth_alpha=0.7),
    "alpha0.0": dict(smooth_alpha=0.0),
    "quarot": dict(rotation="quarot"),
    "atm_ohb": dict(atm=True, ohb=True),
    "awq": dict(smooth="awq"),
    "per_step": dict(act_mode="per_step"),
    "static": dict(act_mode="static"),
    "w8a4": dict(w_bits=8),  # which half of W4A4 costs the success (RESULTS §21)
    "w4a8": dict(a_bits=8),
    "backbone_a8": dict(backbone_a_bits=8),  # the recipe option +backbone-a8
}
KEYS = ("model", "recipe", "success_q", "success_fp", "p_value", "action_divergence")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    ap.add_argument("--episodes", type=int, default=200, help="per family")
    ap.add_argument("--seed", type=int, default=0, help="first episode seed of each family")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cache: dict = {}  # the float rollouts, run once
    evaluate(args.model, "float", episodes=args.episodes, seed=args.seed, float_cache=cache, progress=False)
    for name in args.variants:
        recipe = RECIPES["omega-w4a4"].with_(name=f"omega-w4a4[{name}]", **VARIANTS[name])
        r = evaluate(args.model, recipe, episodes=args.episodes, seed=args.seed, float_cache=cache, progress=False)
        print(json.dumps({**{k: r[k] for k in KEYS}, "seed": args.seed}), flush=True)


if __name__ == "__main__":
    main()
