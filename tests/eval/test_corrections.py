"""DAgger data: expert chunks planned from arbitrary states, and the states a policy visits labelled with them."""

import numpy as np
import torch

from qvla_compiler.eval.dataset import collect_corrections, expert_chunk
from qvla_compiler.eval.expert import ScriptedExpert
from qvla_compiler.eval.tabletop import ACTION_DIM, MAX_STEPS, TabletopEnv


def _expert_rollout(family: str, seed: int, n: int) -> np.ndarray:
    env, expert, out = TabletopEnv(family, seed), ScriptedExpert(), []
    env.reset()
    while len(out) < n and not env.done:
        out.append(expert.clean_action(env.get_state()))
        env.step(out[-1])
    return np.array(out, np.float32)


def test_expert_chunk_is_the_clean_expert_rollout_and_leaves_the_state_alone():
    for family in ("reach", "push", "sequence"):
        env = TabletopEnv(family, 11)
        env.reset()
        before = env.get_state()
        acts, mask = expert_chunk(TabletopEnv(family, 0), before, horizon=6)
        assert acts.shape == (6, ACTION_DIM) and mask.all()
        np.testing.assert_array_equal(acts, _expert_rollout(family, 11, 6))
        after = env.get_state()
        assert np.array_equal(after.agent, before.agent) and after.t == before.t


def test_expert_chunk_pads_with_zeros_after_the_episode_ends():
    family, seed = "reach", 3
    full = _expert_rollout(family, seed, 100)          # the whole successful episode
    env = TabletopEnv(family, seed)
    env.reset()
    for a in full[:-2]:
        env.step(a)
    acts, mask = expert_chunk(TabletopEnv(family, 0), env.get_state(), horizon=5)
    assert mask.tolist() == [True, True, False, False, False]
    np.testing.assert_array_equal(acts[:2], full[-2:])
    assert np.all(acts[2:] == 0)


def test_collect_corrections_records_every_visited_state_of_a_failing_policy():
    # a policy that never moves: every episode runs to its step limit on the initial state
    def still(batch):
        return torch.zeros(batch["images"].shape[0], 4, ACTION_DIM)

    d = collect_corrections(still, 2, seed=700, horizon=4, n_exec=2, image_size=32, scene=True,
                            image_dtype=torch.uint8, action_dim=3, state_dim=9)
    per_family = [MAX_STEPS[f] for f in d["families"]]
    assert d["images"].shape[0] == 2 * sum(per_family) and d["images"].shape[1:] == (3, 32, 32)
    assert d["policy_success"] == 0.0 and d["n_episodes_kept"] == 6
    assert d["action_chunks"].shape[1:] == (4, 3) and torch.all(d["action_chunks"][..., 2:] == 0)
    assert d["state"].shape[1] == 9 and d["landmarks"].shape[1:] == (2, 2)
    # the agent never moved, so every sample of an episode carries the expert's chunk from the initial state
    first = d["episode"] == 0
    want, _ = expert_chunk(TabletopEnv("reach", 0), TabletopEnv("reach", 700).get_state(), 4)
    assert torch.equal(d["action_chunks"][first][:, :, :2], torch.from_numpy(want).expand(int(first.sum()), 4, 2))
    assert torch.equal(d["images"][first][0], d["images"][first][-1])


def test_collect_corrections_every_keeps_the_chunk_boundaries():
    def still(batch):
        return torch.zeros(batch["images"].shape[0], 4, ACTION_DIM)

    d = collect_corrections(still, 1, seed=700, horizon=4, families=["reach"], n_exec=4, every=4, image_size=32)
    assert d["images"].shape[0] == -(-MAX_STEPS["reach"] // 4)   # t = 0, 4, ..., 28
