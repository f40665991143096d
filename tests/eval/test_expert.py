import numpy as np
import pytest
import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.dataset import collect_demonstrations
from qvla_compiler.eval.expert import ScriptedExpert
from qvla_compiler.eval.tabletop import ACTION_DIM, STATE_DIM, TabletopEnv
from qvla_compiler.eval.tokenizer import MAX_TOKENS


def _success_rate(family, noise, n=30):
    expert = ScriptedExpert(noise, seed=0)
    wins = 0
    for seed in range(n):
        env = TabletopEnv(family, seed)
        env.reset()
        done = False
        while not done:
            a = expert.act(env.get_state())
            assert a.shape == (ACTION_DIM,) and np.all(np.abs(a) <= 1.0)
            _, done, info = env.step(a)
        wins += info["success"]
    return wins / n


@pytest.mark.parametrize("family", ["reach", "push", "sequence"])
@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_expert_solves_family(family, noise):
    assert _success_rate(family, noise) >= 0.95


def test_collect_demonstrations_shapes_and_padding():
    horizon = 6
    d = collect_demonstrations(2, seed=500, horizon=horizon)
    n = d["images"].shape[0]
    assert d["images"].shape[1:] == (3, 64, 64) and d["images"].dtype == torch.float32
    assert 0.0 <= float(d["images"].min()) and float(d["images"].max()) <= 1.0
    assert d["tokens"].shape == (n, MAX_TOKENS) and d["token_mask"].shape == (n, MAX_TOKENS)
    assert d["state"].shape == (n, STATE_DIM)
    assert d["action_chunks"].shape == (n, horizon, ACTION_DIM)
    assert d["n_episodes_kept"] == 6
    # chunks are shifted windows of the same action sequence; zero padding at the end
    ep = d["episode"] == 0
    chunks, mask = d["action_chunks"][ep], d["chunk_mask"][ep]
    assert torch.equal(chunks[1:, 0], chunks[:-1, 1])
    assert not mask[-1, 1:].any() and mask[-1, 0]
    assert torch.all(chunks[-1, 1:] == 0)
    last = collect_demonstrations(1, seed=500, horizon=horizon, families=["reach"], pad="last",
                                  image_dtype=torch.uint8)
    assert last["images"].dtype == torch.uint8
    assert torch.all(last["action_chunks"][-1] == last["action_chunks"][-1, 0])
    wide = collect_demonstrations(1, seed=500, horizon=4, families=["push"], action_dim=7, state_dim=10,
                                  image_size=32)
    assert wide["action_chunks"].shape[1:] == (4, 7) and torch.all(wide["action_chunks"][..., 2:] == 0)
    assert wide["state"].shape[1] == 10 and wide["images"].shape[2:] == (32, 32)


def test_collect_demonstrations_per_family_counts():
    d = collect_demonstrations({"reach": 1, "push": 3}, seed=500, horizon=4, families=["reach", "push"])
    episodes_per_family = [len(set(d["episode"][d["family"] == fi].tolist())) for fi in range(2)]
    assert episodes_per_family == [1, 3] and d["n_episodes_kept"] == 4
    # a mapping with equal counts is the same collection as the plain count
    same = collect_demonstrations({"reach": 1, "push": 1}, seed=500, horizon=4, families=["reach", "push"])
    plain = collect_demonstrations(1, seed=500, horizon=4, families=["reach", "push"])
    assert all(torch.equal(same[k], plain[k]) for k in ("images", "state", "action_chunks", "family"))
    with pytest.raises(QvlaError, match="must name exactly the families"):
        collect_demonstrations({"reach": 1}, seed=500, horizon=4, families=["reach", "push"])
    with pytest.raises(QvlaError, match="n_episodes >= 1"):
        collect_demonstrations({"reach": 0, "push": 1}, seed=500, horizon=4, families=["reach", "push"])


def test_expert_solves_push_from_wide_starts():
    from qvla_compiler.eval.tasks import redraw_push_start

    expert = ScriptedExpert(0.1, seed=0)
    wins = 0
    for seed in range(30):
        env = TabletopEnv("push", seed)
        env.set_state(redraw_push_start(env.get_state(), seed))
        while not env.done:
            env.step(expert.act(env.state))
        wins += env.check_success()
    assert wins >= 29


def test_collect_demonstrations_wide_push_starts():
    seeds = range(500, 510)
    kw = dict(seed=500, horizon=4, families=["push"])
    plain = collect_demonstrations(len(seeds), **kw)
    wide = collect_demonstrations(len(seeds), wide_push_starts=0.5, **kw)
    def starts(d):
        return [d["state"][d["episode"] == e][0] for e in range(d["n_episodes_kept"])]

    moved = [not torch.equal(a, b) for a, b in zip(starts(plain), starts(wide))]
    assert 0 < sum(moved) < len(seeds)  # some episodes, not all, start elsewhere
    assert torch.equal(collect_demonstrations(len(seeds), wide_push_starts=0.0, **kw)["state"], plain["state"])
    reach = collect_demonstrations(2, seed=500, horizon=4, families=["reach"])
    assert torch.equal(collect_demonstrations(2, seed=500, horizon=4, families=["reach"],
                                              wide_push_starts=1.0)["state"], reach["state"])
    with pytest.raises(QvlaError, match="share of the push episodes"):
        collect_demonstrations(1, wide_push_starts=1.5, **kw)


def test_scene_labels_name_the_instruction_landmarks():
    from qvla_compiler.eval.dataset import MAX_OBJECTS, scene_labels
    from qvla_compiler.eval.tabletop import COLOURS, SHAPES

    for family in ("reach", "push", "sequence"):
        env = TabletopEnv(family, 3)
        env.reset()
        s = env.get_state()
        landmarks, objects = scene_labels(s)
        assert landmarks.shape == (2, 2) and objects.shape == (MAX_OBJECTS, 3)
        first = s.objects[s.targets[0]]
        np.testing.assert_allclose(landmarks[0], first.pos, rtol=1e-6)
        cls = 1 + list(COLOURS).index(first.colour) * len(SHAPES) + SHAPES.index(first.shape)
        assert cls in objects[:, 2]
        if family == "push":
            np.testing.assert_allclose(landmarks[1], s.zones[s.goal_zone].pos, rtol=1e-6)
            assert (objects[2:] == 0).all()          # two blocks, the rest padding
        elif family == "sequence":
            np.testing.assert_allclose(landmarks[1], s.objects[s.targets[1]].pos, rtol=1e-6)
            s.stage = 1                             # after the first touch both landmarks are the second target
            later, _ = scene_labels(s)
            np.testing.assert_allclose(later[0], later[1])
    d = collect_demonstrations(1, seed=500, horizon=4, families=["sequence"], scene=True)
    assert d["landmarks"].shape == (d["images"].shape[0], 2, 2) and d["objects"].shape[1:] == (MAX_OBJECTS, 3)
