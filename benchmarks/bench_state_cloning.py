"""Can a family be cloned at all? Behaviour cloning from the true simulator state, no pixels, no language.

A learnability probe for the tabletop suite: an MLP reads the positions a perfect perception would give (agent,
the instruction's landmarks, every object) and regresses the expert's action chunk; then it runs closed loop. A
family that this cannot clone will not be learned by a VLA from pixels either::

    python benchmarks/bench_state_cloning.py [--episodes 3000] [--steps 8000] [--eval 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvla_compiler.eval.dataset import collect_demonstrations, scene_labels  # noqa: E402
from qvla_compiler.eval.tabletop import FAMILIES, TabletopEnv  # noqa: E402

HORIZON, N_EXEC = 8, 4


def features(agent: torch.Tensor, landmarks: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
    """[B, 2 + 4 + 2 * MAX_OBJECTS]: agent, the two landmarks, every object's position (table units)."""
    return torch.cat([agent, landmarks.flatten(1), objects[..., :2].flatten(1)], dim=1)


def train(family: str, episodes: int, steps: int, seed: int) -> tuple[torch.nn.Module, float]:
    data = collect_demonstrations(episodes, 100_000, HORIZON, families=[family], image_size=8,
                                  image_dtype=torch.uint8, scene=True)
    x = features((data["state"][:, :2] + 1) / 2, data["landmarks"], data["objects"])
    y = data["action_chunks"].flatten(1)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 256),
                              torch.nn.GELU(), torch.nn.Linear(256, y.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=gen)
        loss = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = 1e-3 * (1 - step / steps) + 1e-5
    return net.eval(), loss.item()


@torch.no_grad()
def closed_loop(net: torch.nn.Module, family: str, episodes: int) -> float:
    wins = 0
    for seed in range(episodes):
        env = TabletopEnv(family, seed, image_size=8)
        env.reset()
        done, info = False, {"success": False}
        while not done:
            s = env.get_state()
            lm, ob = scene_labels(s)
            x = features(torch.tensor(s.agent, dtype=torch.float32)[None], torch.from_numpy(lm)[None],
                         torch.from_numpy(ob)[None])
            chunk = net(x).view(HORIZON, -1).numpy()
            for k in range(N_EXEC):
                _, done, info = env.step(chunk[k])
                if done:
                    break
        wins += info["success"]
    return wins / episodes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=3000, help="expert episodes per family (seeds 100000+)")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--eval", type=int, default=200, help="closed-loop episodes per family (seeds 0..N-1)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for fam in args.families:
        t0 = time.time()
        net, loss = train(fam, args.episodes, args.steps, args.seed)
        rows.append({"family": fam, "success": closed_loop(net, fam, args.eval), "final_train_mse": loss,
                     "seconds": round(time.time() - t0, 1)})
        if not args.json:
            print(f"{fam}: closed-loop success {100 * rows[-1]['success']:.1f}% from the true state "
                  f"(train MSE {loss:.4f}, {rows[-1]['seconds']:.0f}s)", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
