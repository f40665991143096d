import numpy as np
import pytest
import torch

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.runner import episode_noise, run_episode, run_episodes
from qvla_compiler.eval.tabletop import (
    ACTION_DIM, BLOCK_RADIUS, FAMILIES, IMAGE_SIZE, MAX_STEPS, STATE_DIM, TOUCH_TOL, ZONE_TOL, TabletopEnv,
    make_episode,
)


def _rollout(env, actions):
    out = [env.reset()]
    for a in actions:
        obs, done, info = env.step(a)
        out.append(obs)
        if done:
            break
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_same_episode(family):
    acts = np.random.default_rng(0).uniform(-1, 1, (15, ACTION_DIM))
    a = _rollout(TabletopEnv(family, 11), acts)
    b = _rollout(make_episode(family, 11), acts)
    assert len(a) == len(b)
    for oa, ob in zip(a, b):
        assert oa["instruction"] == ob["instruction"]
        np.testing.assert_array_equal(oa["image"], ob["image"])
        np.testing.assert_array_equal(oa["state"], ob["state"])
    # reset returns the same initial observation again
    env = TabletopEnv(family, 11)
    first = env.reset()
    env.step(np.ones(ACTION_DIM))
    again = env.reset()
    np.testing.assert_array_equal(first["image"], again["image"])
    # different seeds differ
    other = TabletopEnv(family, 12).reset()
    assert not np.array_equal(first["image"], other["image"])


@pytest.mark.parametrize("family", FAMILIES)
def test_observation_format(family):
    obs = TabletopEnv(family, 0).reset()
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (STATE_DIM,)
    assert isinstance(obs["instruction"], str) and obs["instruction"]
    small = TabletopEnv(family, 0, image_size=32).reset()
    assert small["image"].shape == (32, 32, 3)


def test_reach_success_and_failure():
    env = TabletopEnv("reach", 3)
    env.reset()
    s = env.get_state()
    target = s.objects[s.targets[0]].pos
    s.agent = target + np.array([TOUCH_TOL * 0.9, 0.0])
    env.set_state(s)
    assert env.check_success()
    s.agent = target + np.array([TOUCH_TOL * 1.2, 0.0])
    env.set_state(s)
    assert not env.check_success()
    # standing on a distractor is not success
    other = next(i for i in range(len(s.objects)) if i != s.targets[0])
    s.agent = s.objects[other].pos.copy()
    env.set_state(s)
    assert not env.check_success()
    # stepping onto the target ends the episode with success
    s.agent = target + np.array([0.07, 0.0])
    env.set_state(s)
    assert not env.done
    _, done, info = env.step(np.array([-0.6, 0.0]))
    assert done and info["success"]


def test_push_starts_behind_the_named_block():
    for seed in range(200):
        s = TabletopEnv("push", seed).get_state()
        block, zone = s.objects[s.targets[0]].pos, s.zones[s.goal_zone].pos
        back = (block - zone) / np.linalg.norm(block - zone)
        rel = s.agent - block
        assert 0.15 - 1e-9 <= np.linalg.norm(rel) <= 0.3 + 1e-9
        assert rel @ back >= np.cos(np.radians(60.0)) * np.linalg.norm(rel) - 1e-9
        assert np.all((s.agent >= 0.08) & (s.agent <= 0.92))
        assert np.linalg.norm(s.agent - s.objects[1 - s.targets[0]].pos) >= 0.15


def test_redraw_push_start_goes_all_round_and_keeps_the_scene():
    from qvla_compiler.eval.tasks import redraw_push_start

    angles = []
    for seed in range(100):
        s = TabletopEnv("push", seed).get_state()
        r = redraw_push_start(s, seed)
        assert r.instruction == s.instruction and r.t == 0
        assert all(np.array_equal(a.pos, b.pos) for a, b in zip(r.objects, s.objects))
        block, zone = r.objects[r.targets[0]].pos, r.zones[r.goal_zone].pos
        rel = r.agent - block
        assert 0.15 - 1e-9 <= np.linalg.norm(rel) <= 0.3 + 1e-9
        assert np.linalg.norm(r.agent - r.objects[1 - r.targets[0]].pos) >= 0.15
        back = (block - zone) / np.linalg.norm(block - zone)
        angles.append(np.degrees(np.arccos(np.clip(rel @ back / np.linalg.norm(rel), -1, 1))))
        assert np.array_equal(redraw_push_start(s, seed).agent, r.agent)  # seeded
    assert max(angles) > 120.0 and min(angles) < 60.0  # in front of the block as well as behind it
    placed = 0
    for seed in range(20):  # max_angle bounds the angle off the axis behind the block
        try:
            r = redraw_push_start(TabletopEnv("push", seed).get_state(), seed, max_angle=10.0)
        except QvlaError as e:  # a narrow cone can run off the table: a clear error, not a bad start
            assert "widen the angle" in str(e)
            continue
        placed += 1
        block, zone = r.objects[r.targets[0]].pos, r.zones[r.goal_zone].pos
        rel, back = r.agent - block, (block - zone) / np.linalg.norm(block - zone)
        assert rel @ back >= np.cos(np.radians(10.0)) * np.linalg.norm(rel) - 1e-9
    assert placed >= 10
    with pytest.raises(QvlaError, match="initial state of a push"):
        redraw_push_start(TabletopEnv("reach", 0).get_state(), 0)
    with pytest.raises(QvlaError, match="max_angle"):
        redraw_push_start(TabletopEnv("push", 0).get_state(), 0, max_angle=0.0)


def test_push_success_and_contact():
    env = TabletopEnv("push", 4)
    env.reset()
    s = env.get_state()
    zone = s.zones[s.goal_zone].pos
    block = s.targets[0]
    s.objects[block].pos = zone + np.array([ZONE_TOL * 0.9, -ZONE_TOL * 0.5])
    env.set_state(s)
    assert env.check_success()
    s.objects[block].pos = zone + np.array([ZONE_TOL * 1.3, 0.0])
    env.set_state(s)
    assert not env.check_success()
    # the wrong block in the goal zone, the right block in the other zone: failure
    other_block, other_zone = 1 - block, 1 - s.goal_zone
    s.objects[other_block].pos = zone.copy()
    s.objects[block].pos = s.zones[other_zone].pos.copy()
    env.set_state(s)
    assert not env.check_success()
    # kinematic contact: moving right into the block pushes it right; moving away leaves it
    env.reset()
    s = env.get_state()
    s.objects[block].pos = np.array([0.5, 0.5])
    s.objects[other_block].pos = np.array([0.2, 0.2])
    s.agent = np.array([0.5 - 0.08 - 0.01, 0.5])
    env.set_state(s)
    env.step(np.array([1.0, 0.0]))
    after = env.get_state()
    assert after.objects[block].pos[0] > 0.5 + 0.03
    assert abs(after.objects[block].pos[1] - 0.5) < 1e-9
    env.step(np.array([-1.0, 0.0]))
    np.testing.assert_allclose(env.get_state().objects[block].pos, after.objects[block].pos)


def test_pushed_block_slides_with_the_pusher_from_the_moment_of_contact():
    env = TabletopEnv("push", 4)
    s = env.get_state()
    block, other = s.targets[0], 1 - s.targets[0]
    s.objects[other].pos = np.array([0.15, 0.85])
    # behind and off-axis by 0.03: the block follows the move (diagonal), not the contact normal
    s.objects[block].pos = np.array([0.5, 0.5])
    s.agent = np.array([0.5 - 0.075, 0.47])      # 0.0808 from the centre: touches early in the step
    env.set_state(s)
    env.step(np.array([0.6, 0.8]))
    moved = env.get_state().objects[block].pos - np.array([0.5, 0.5])
    assert abs(moved[0] * 0.8 - moved[1] * 0.6) < 1e-12 and 0.045 < np.linalg.norm(moved) < 0.05
    # starting 0.03 short of contact, a full step right moves the block by the remaining 0.02
    s.objects[block].pos = np.array([0.5, 0.5])
    s.agent = np.array([0.5 - 0.08 - 0.03, 0.5])
    env.set_state(s)
    env.step(np.array([1.0, 0.0]))
    np.testing.assert_allclose(env.get_state().objects[block].pos, [0.52, 0.5], atol=1e-12)
    # against the wall the block stops and the agent stops at its surface
    s.objects[block].pos = np.array([1.0 - BLOCK_RADIUS, 0.5])
    s.agent = np.array([1.0 - BLOCK_RADIUS - 0.08, 0.5])
    env.set_state(s)
    env.step(np.array([1.0, 0.0]))
    after = env.get_state()
    np.testing.assert_allclose(after.objects[block].pos, [1.0 - BLOCK_RADIUS, 0.5], atol=1e-12)
    assert np.linalg.norm(after.agent - after.objects[block].pos) >= 0.08 - 1e-9


def test_sequence_order_matters():
    env = TabletopEnv("sequence", 5)
    env.reset()
    s = env.get_state()
    first, second = (s.objects[i].pos.copy() for i in s.targets)
    # on the second target before the first: no progress, no success
    s.agent = second.copy()
    env.set_state(s)
    _, done, info = env.step(np.zeros(ACTION_DIM))
    assert not done and not info["success"] and info["stage"] == 0
    # touch the first, then the second
    s = env.get_state()
    s.agent = first.copy()
    env.set_state(s)
    _, done, info = env.step(np.zeros(ACTION_DIM))
    assert info["stage"] == 1 and not done
    assert env.proprio()[2] == pytest.approx(0.5)
    s = env.get_state()
    s.agent = second.copy()
    env.set_state(s)
    _, done, info = env.step(np.zeros(ACTION_DIM))
    assert done and info["success"]


@pytest.mark.parametrize("family", FAMILIES)
def test_episode_times_out(family):
    env = TabletopEnv(family, 0)
    env.reset()
    s = env.get_state()
    s.agent = np.array([0.0, 0.0]) if family != "push" else s.agent
    env.set_state(s)
    done, t = False, 0
    while not done:
        _, done, info = env.step(np.zeros(ACTION_DIM))
        t += 1
    assert t == MAX_STEPS[family] and not info["success"]
    with pytest.raises(QvlaError):
        env.step(np.zeros(ACTION_DIM))


def test_nonfinite_action_does_not_crash():
    env = TabletopEnv("reach", 0)
    env.reset()
    _, _, info = env.step(np.array([np.nan, np.inf]))
    assert info["nonfinite_action"]
    with pytest.raises(QvlaError):
        TabletopEnv("stack", 0)


def _noise_policy(horizon):
    calls = []

    def fn(batch):
        B = batch["images"].shape[0]
        assert batch["images"].dtype == torch.float32 and batch["images"].shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert float(batch["images"].max()) <= 1.0
        assert batch["tokens"].dtype == torch.int64 and batch["token_mask"].dtype == torch.bool
        assert batch["state"].shape == (B, STATE_DIM)
        assert batch["noise"].shape == (B, horizon, ACTION_DIM)
        calls.append(B)
        return batch["noise"].clamp(-1, 1)

    return fn, calls


def test_batched_runner_matches_single_and_is_reproducible():
    fams = ["reach", "push", "sequence"] * 3
    seeds = list(range(9))
    fn, calls = _noise_policy(6)
    a = run_episodes(fams, seeds, fn, n_exec=3, noise_seed=7, horizon=6, record_frames=True)
    assert len(calls) < sum(r.policy_calls for r in a)   # calls were batched
    b = run_episodes(fams, seeds, _noise_policy(6)[0], n_exec=3, noise_seed=7, horizon=6,
                     max_batch=4, fixed_batch=True, record_frames=True)
    c = [run_episode(TabletopEnv(f, s), _noise_policy(6)[0], 3, noise_seed=7, horizon=6, record_frames=True)
         for f, s in zip(fams, seeds)]
    d = run_episodes(fams, seeds, _noise_policy(6)[0], n_exec=3, noise_seed=8, horizon=6, record_frames=True)

    def key(results):
        return [(r.family, r.seed, r.success, r.steps, r.policy_calls, r.frames[-1].tobytes()) for r in results]

    assert key(a) == key(b) == key(c)
    assert key(a) != key(d)


def test_episode_noise_deterministic():
    x = episode_noise(1, "push", 3, 2, 8)
    assert x.shape == (8, ACTION_DIM) and x.dtype == torch.float32
    assert torch.equal(x, episode_noise(1, "push", 3, 2, 8))
    assert not torch.equal(x, episode_noise(1, "push", 3, 3, 8))
    assert not torch.equal(x, episode_noise(2, "push", 3, 2, 8))


def test_runner_rejects_bad_policy_output():
    with pytest.raises(QvlaError):
        run_episodes("reach", [0], lambda b: torch.zeros(1, 2, ACTION_DIM), n_exec=4)


def test_record_frames():
    r = run_episodes("reach", [0], lambda b: torch.zeros(b["images"].shape[0], 4, ACTION_DIM), n_exec=4,
                     record_frames=True)[0]
    assert len(r.frames) == r.steps + 1 == MAX_STEPS["reach"] + 1


def test_side_by_side_gif(tmp_path):
    from PIL import Image

    from qvla_compiler.eval.video import write_side_by_side_gif

    pol = lambda b: torch.zeros(b["images"].shape[0], 4, ACTION_DIM)  # noqa: E731
    a = run_episodes("reach", [1], pol, n_exec=4, record_frames=True)[0]
    b = TabletopEnv("reach", 1)
    frames_b = [b.reset()["image"]] + [b.step(np.array([1.0, 0.0]))[0]["image"] for _ in range(5)]
    path = write_side_by_side_gif(str(tmp_path / "cmp.gif"), a.frames, frames_b, caption=a.instruction,
                                  success_a=a.success, success_b=False)
    with Image.open(path) as im:  # Pillow merges identical consecutive frames, keeping the timing
        total = 0
        for k in range(im.n_frames):
            im.seek(k)
            total += im.info["duration"]
        assert 1 < im.n_frames <= max(len(a.frames), len(frames_b))
        assert abs(total - 125 * max(len(a.frames), len(frames_b))) <= 10 * im.n_frames  # centisecond rounding


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_render_matches_full_frame_render(family):
    env = TabletopEnv(family, 2, image_size=32)
    env.reset()
    rng = np.random.default_rng(1)
    for _ in range(25):
        obs, done, _ = env.step(rng.uniform(-1, 1, ACTION_DIM))
        np.testing.assert_array_equal(obs["image"], env.render_reference())
        if done:
            env.reset()


def test_wider_policy_dims_are_padded():
    from qvla_compiler.eval.tokenizer import Tokenizer

    def fn(batch):
        assert batch["state"].shape[1] == 12 and torch.all(batch["state"][:, STATE_DIM:] == 0)
        assert batch["tokens"].shape[1] == 20
        assert batch["noise"].shape[1:] == (5, 7)
        return batch["noise"]

    r = run_episodes("push", [0, 1], fn, 5, noise_seed=0, horizon=5, action_dim=7, state_dim=12,
                     tokenizer=Tokenizer(max_len=20))
    assert len(r) == 2


def test_state_has_position_but_not_the_last_motion():
    env = TabletopEnv("reach", 5)
    before = env.reset()["state"]
    obs, _, _ = env.step(np.array([1.0, -1.0]))
    assert obs["state"][0] > before[0] and obs["state"][1] < before[1]   # position moved
    assert np.all(obs["state"][2:] == 0) and np.all(before[2:] == 0)      # no velocity to copy
