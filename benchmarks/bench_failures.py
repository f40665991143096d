"""Why a trained tabletop policy fails: where each failed episode ends, per family (float policy, held-out seeds).

    python benchmarks/bench_failures.py --model groot-tabletop --episodes 200 [--checkpoint other.safetensors]

reach / sequence: the agent's final distance to the object it should be touching (< 0.1, 0.1-0.2, >= 0.2), whether
it ended nearer another object than that one, and (reach) how many failures came within 0.08 of the target at some
point: the episodes a looser touch tolerance (0.08 instead of TOUCH_TOL) would have counted as solved, since an
episode's trajectory up to its first touch does not depend on the tolerance.
push: the named block never moved, the other block moved, and the final block-to-zone distance (L-inf).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvla_compiler.eval.runner import run_episodes, runner_kwargs, sample_actions_policy  # noqa: E402
from qvla_compiler.eval.tabletop import FAMILIES, TabletopEnv  # noqa: E402
from qvla_compiler.models.checkpoints import load_checkpoint  # noqa: E402
from qvla_compiler.models.registry import build_policy  # noqa: E402

LOOSE_TOL = 0.08


def _bin(d: float) -> str:
    return "< 0.1" if d < 0.1 else ("0.1-0.2" if d < 0.2 else ">= 0.2")


def _object_failure(state) -> list[str]:
    k = min(state.stage, len(state.targets) - 1)
    target = state.objects[state.targets[k]].pos
    d = float(np.linalg.norm(state.agent - target))
    others = [float(np.linalg.norm(state.agent - o.pos)) for i, o in enumerate(state.objects) if i != state.targets[k]]
    tags = [f"ends {_bin(d)} from the target"]
    if min(others) < d:
        tags.append("ends nearer another object")
    if state.family == "sequence":
        tags.append(f"touched {state.stage} of 2")
    return tags


def _push_failure(initial, state) -> list[str]:
    t = state.targets[0]
    moved = [float(np.linalg.norm(o.pos - o0.pos)) > 0.01 for o, o0 in zip(state.objects, initial.objects)]
    if not moved[t]:
        tags = ["named block never moved"]
    else:
        err = float(np.max(np.abs(state.objects[t].pos - state.zones[state.goal_zone].pos)))
        tags = [f"block ends {_bin(err)} from the zone centre"]
    if moved[1 - t]:
        tags.append("other block moved")
    return tags


def diagnose(policy, family: str, seeds: range) -> dict:
    closest: dict[int, float] = {}
    envs: dict[int, TabletopEnv] = {}   # the runner's envs: after the run they hold each episode's final state

    def track(i: int, env: TabletopEnv, obs: dict) -> None:
        envs[i] = env
        s = env.state
        d = float(np.linalg.norm(s.agent - s.objects[s.targets[min(s.stage, len(s.targets) - 1)]].pos))
        closest[i] = min(closest.get(i, np.inf), d)

    kw = runner_kwargs(policy.config)
    results = run_episodes(family, seeds, sample_actions_policy(policy), 4, noise_seed=0, on_step=track, **kw)
    tags: Counter = Counter()
    loose = 0
    for i, (seed, res) in enumerate(zip(seeds, results)):
        if res.success:
            continue
        final = envs[i].get_state()
        initial = TabletopEnv(family, seed).get_state()
        tags.update(_push_failure(initial, final) if family == "push" else _object_failure(final))
        track(i, envs[i], {})  # the hook runs before each step: count the state after the last one too
        loose += family == "reach" and closest[i] <= LOOSE_TOL
    out = {"episodes": len(results), "success": sum(r.success for r in results), "failures": dict(tags)}
    if family == "reach":
        out[f"failures within {LOOSE_TOL} at some point"] = int(loose)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="groot-tabletop")
    ap.add_argument("--episodes", type=int, default=200, help="evaluation seeds 0..N-1 per family")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint file to load instead of the committed one")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = build_policy(args.model, pretrained=args.checkpoint is None)
    if args.checkpoint:
        load_checkpoint(policy, args.checkpoint)
    report = {fam: diagnose(policy, fam, range(args.episodes)) for fam in FAMILIES}
    if args.json:
        print(json.dumps({"model": args.model, "checkpoint": args.checkpoint, **report}, indent=2))
        return 0
    for fam, r in report.items():
        print(f"{args.model} {fam}: {r['success']}/{r['episodes']} solved")
        for tag, n in sorted(r["failures"].items(), key=lambda kv: -kv[1]):
            print(f"    {n:4d}  {tag}")
        for key in r:
            if key.startswith("failures within"):
                print(f"    {r[key]:4d}  {key} (solved with a touch tolerance of {LOOSE_TOL})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
