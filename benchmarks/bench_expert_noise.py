"""How much perception error the scripted expert tolerates: success when it sees noisy positions.

A cloned policy perceives positions with some error; a task whose expert fails under that error cannot be learned
by cloning it. This runs the expert of every family with Gaussian noise (std sigma, table units, drawn afresh each
step) on the object / zone positions it reads and sigma / 2 on its own position::

    python benchmarks/bench_expert_noise.py --episodes 200 [--sigmas 0 0.02 0.04 0.06 0.08] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvla_compiler.eval.expert import ScriptedExpert  # noqa: E402
from qvla_compiler.eval.tabletop import FAMILIES, TabletopEnv, TabletopState  # noqa: E402


def perceived(state: TabletopState, sigma: float, rng: np.random.Generator) -> TabletopState:
    seen = state.copy()
    for thing in [*seen.objects, *seen.zones]:
        thing.pos = thing.pos + rng.normal(0.0, sigma, 2)
    seen.agent = seen.agent + rng.normal(0.0, sigma / 2, 2)
    return seen


def run(family: str, sigma: float, episodes: int) -> dict:
    expert, rng = ScriptedExpert(0.1, seed=1), np.random.default_rng(0)
    wins, lengths = 0, []
    for seed in range(episodes):
        env = TabletopEnv(family, seed, image_size=8)   # the expert never looks at the image
        env.reset()
        done, info = False, {"success": False, "t": 0}
        while not done:
            _, done, info = env.step(expert.act(perceived(env.get_state(), sigma, rng)))
        wins += info["success"]
        lengths.append(info["t"])
    return {"family": family, "sigma": sigma, "success": wins / episodes, "mean_steps": float(np.mean(lengths))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.02, 0.04, 0.06, 0.08])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = [run(f, s, args.episodes) for f in FAMILIES for s in args.sigmas]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| family | " + " | ".join(f"sigma {s:g}" for s in args.sigmas) + " |")
    print("|---|" + "---|" * len(args.sigmas))
    for f in FAMILIES:
        cells = [f"{100 * r['success']:.1f}% ({r['mean_steps']:.0f} steps)" for r in rows if r["family"] == f]
        print(f"| {f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
