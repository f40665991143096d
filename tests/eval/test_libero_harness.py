"""The LIBERO harness's own logic, without LIBERO or lerobot (default run, a few seconds).

Rollout bookkeeping and pairing run against STAND-INS: `FakeTaskEnv` has LiberoTaskEnv's interface with a trivial
point-mass "robot", `FakePolicy` has LiberoPolicy's with a closed-form "policy". They check the harness's mechanics
(chunking, episode bookkeeping, same noise per call, divergence maths, aggregation, errors), not LIBERO: the real
simulator and a real lerobot π0.5 are exercised in test_libero.py (marker `libero`).
"""
import json
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from qvla_compiler.errors import QvlaError


class FakeTaskEnv:
    """STAND-IN for LiberoTaskEnv: end effector = a point that moves by 1 cm × action[:3]; success past x = 0.1."""

    def __init__(self, suite="libero_spatial", task_id=0, max_steps=23, goal=0.1):
        self.suite, self.task_id, self.name, self.instruction = suite, task_id, "fake_task", "reach the goal"
        self.max_steps, self.goal, self.steps, self.captures = max_steps, goal, 0, 0

    def reset(self, episode):
        self.pos, self.steps = np.array([0.01 * episode, 0.0, 0.0]), 0
        self._captured = True
        return SimpleNamespace(eef_pos=self.pos.copy())

    def frames(self):
        assert self._captured, "frames() without a capture step"
        return {"agentview": np.full((4, 4, 3), int(self.steps) % 256, np.uint8)}

    def step(self, action, capture=False):
        self.pos = self.pos + 0.01 * np.asarray(action[:3])
        self.steps += 1
        self._captured = capture
        self.captures += capture
        success = bool(self.pos[0] > self.goal)
        return SimpleNamespace(eef_pos=self.pos.copy()), success, success or self.steps >= self.max_steps


class FakePolicy:
    """STAND-IN for LiberoPolicy: observation = the end-effector position; actions from state and noise."""

    horizon, noise_dim = 6, 8

    def __init__(self, n_action_steps=4):
        self.n_action_steps, self.noises = n_action_steps, []

    def observation(self, frames, obs, instruction):
        return {"state": torch.tensor(obs.eef_pos, dtype=torch.float32)[None]}

    def noise(self, words):
        ss = np.random.SeedSequence(list(words))
        return torch.randn(1, self.horizon, self.noise_dim,
                           generator=torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0])))

    def to_env(self, raw):
        return raw[0, :, :7].double().numpy()

    def act(self, scale=1.0):
        def act(obs, noise):
            self.noises.append(noise.clone())
            base = torch.zeros(1, self.horizon, self.noise_dim)
            base[..., 0] = 1.0 - 10 * obs["state"][0, 0]
            return base + 0.1 * noise * scale
        return act


def test_rollout_bookkeeping_and_rerun_is_bit_identical():
    from qvla_compiler.eval.libero.rollout import run_rollout

    env, policy = FakeTaskEnv(max_steps=23), FakePolicy(n_action_steps=4)
    a, _ = run_rollout(env, policy, policy.act(), episode=0, noise_seed=0)
    b, _ = run_rollout(env, policy, policy.act(), episode=0, noise_seed=0)
    assert a.steps == len(a.eef) - 1 and a.calls == -(-a.steps // 4) and a.actions.shape == (a.calls, 6, 7)
    assert a.steps <= 23 and (a.success or a.steps == 23)
    assert np.array_equal(a.eef, b.eef) and np.array_equal(a.actions, b.actions) and a.digest == b.digest
    c, _ = run_rollout(env, policy, policy.act(), episode=0, noise_seed=1)
    assert c.digest != a.digest  # another noise seed, another rollout


def test_episode_ends_on_success_mid_chunk():
    from qvla_compiler.eval.libero.rollout import run_rollout

    env, policy = FakeTaskEnv(max_steps=200, goal=0.03), FakePolicy(n_action_steps=4)
    r, _ = run_rollout(env, policy, policy.act(scale=0.0), episode=0, noise_seed=0)
    assert r.success and r.eef[-1, 0] > 0.03 and r.eef[-2, 0] <= 0.03  # stopped on the first successful step
    assert env.captures == r.calls - 1 + (r.steps % 4 == 0)  # one capture per chunk (its last step), no more


def test_pair_same_policy_diverges_exactly_zero_and_quantized_sees_the_float_noise():
    from qvla_compiler.eval.libero.rollout import run_pair

    env, policy = FakeTaskEnv(), FakePolicy()
    same = run_pair(env, policy, policy.act(), policy.act(), episode=1, noise_seed=3)
    row = same.to_json()
    assert row["digest_fp"] == row["digest_q"] and row["success_fp"] == row["success_q"]
    assert row["action_l2"] == 0.0 and row["ee_max_m"] == 0.0 and row["separation_step"] is None
    assert row["action_cos"] == 1.0
    # calls: float k (act), shadow k (q), ... then quantized rollout k: the k-th call of each sees the same noise
    n = same.fp.calls
    fp_noises, shadow_noises, q_noises = policy.noises[0:2 * n:2], policy.noises[1:2 * n:2], policy.noises[2 * n:]
    assert len(q_noises) == same.q.calls == n
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(fp_noises, shadow_noises, q_noises))


def test_pair_perturbed_policy_small_divergence_and_separation_step():
    from qvla_compiler.eval.libero.rollout import run_pair

    env, policy = FakeTaskEnv(max_steps=40, goal=10.0), FakePolicy()
    pair = run_pair(env, policy, policy.act(), policy.act(scale=1.3), episode=0, noise_seed=0, separation_m=1e-3)
    row = pair.to_json()
    assert 0 < row["action_rel_l2"] < 0.5 and row["action_cos"] < 1.0
    assert row["ee_max_m"] > 1e-3 and row["separation_step"] is not None
    dist = np.linalg.norm(pair.fp.eef - pair.q.eef, axis=1)
    assert dist[row["separation_step"]] > 1e-3 and (dist[:row["separation_step"]] <= 1e-3).all()


def test_trajectory_divergence_holds_the_shorter_episode_at_its_end():
    from qvla_compiler.eval.libero.rollout import trajectory_divergence

    a = np.array([[0, 0, 0], [0.01, 0, 0], [0.02, 0, 0]], float)
    b = np.array([[0, 0, 0], [0.01, 0, 0], [0.02, 0, 0], [0.05, 0, 0]], float)
    d = trajectory_divergence(a, b, separation_m=0.02)
    assert d["ee_final_m"] == pytest.approx(0.03) and d["ee_max_m"] == pytest.approx(0.03)
    assert d["separation_step"] == 3 and d["ee_mean_m"] == pytest.approx(0.03 / 4)
    assert trajectory_divergence(a, a, 1e-9)["separation_step"] is None


def _row(suite, task_id, episode, fp, q, l2=0.1):
    return {"suite": suite, "task_id": task_id, "task": f"t{task_id}", "episode": episode, "success_fp": fp,
            "success_q": q, "steps_fp": 10, "steps_q": 12, "calls_fp": 2, "calls_q": 3, "action_l2": l2,
            "action_rel_l2": l2 / 10, "action_cos": 0.99, "action_l2_max": 2 * l2, "ee_mean_m": 0.001,
            "ee_max_m": 0.004, "ee_final_m": 0.003, "separation_step": None if fp == q else 7,
            "digest_fp": "a", "digest_q": "b", "seconds_fp": 1.0, "seconds_q": 1.0}


def test_summary_statistics_and_order_independence():
    from qvla_compiler.eval.libero.report import summarize_pairs
    from qvla_compiler.eval.stats import mcnemar_exact, wilson_interval

    rows = [_row("libero_spatial", t, e, fp=True, q=(e % 3 != 0)) for t in (0, 1) for e in range(6)]
    rows += [_row("libero_object", 4, e, fp=e < 2, q=e < 1) for e in range(3)]
    out = summarize_pairs(rows, ["libero_spatial", "libero_object"])
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert json.dumps(summarize_pairs(shuffled, ["libero_spatial", "libero_object"])) == json.dumps(out)
    sp = out["per_suite"]["libero_spatial"]
    assert sp["episodes"] == 12 and sp["success_fp"] == 1.0 and sp["success_q"] == pytest.approx(8 / 12)
    assert sp["ci_q"] == pytest.approx(list(wilson_interval(8, 12)))
    assert sp["p_value"] == pytest.approx(mcnemar_exact([True] * 12, [e % 3 != 0 for _ in (0, 1) for e in range(6)]))
    task = sp["per_task"]["1"]
    assert task["episodes"] == 6 and [e["episode"] for e in task["episodes_list"]] == list(range(6))
    assert task["separated"] == 2 and task["separation_step_median"] == 7.0
    assert out["episodes"] == 15 and set(out["per_suite"]) == {"libero_spatial", "libero_object"}
    assert out["per_suite"]["libero_object"]["fp_only"] == 1


def test_bad_options_are_named_errors_before_anything_loads(tmp_path):
    from qvla_compiler.eval.libero import LiberoTaskError, evaluate_libero, parse_tasks
    from qvla_compiler.recipes import RecipeError

    missing = tmp_path / "nowhere"
    with pytest.raises(QvlaError, match="episodes must be in 1..50"):
        evaluate_libero(missing, episodes=0)
    with pytest.raises(QvlaError, match="episodes must be in 1..50"):
        evaluate_libero(missing, episodes=51)
    with pytest.raises(QvlaError, match="ending in .gif"):
        evaluate_libero(missing, save_video=str(tmp_path / "v.mp4"))
    with pytest.raises(RecipeError, match="unknown recipe"):
        evaluate_libero(missing, recipe="w9a9")
    with pytest.raises(LiberoTaskError, match="unknown LIBERO suite 'libero_nine'"):
        parse_tasks("libero_nine")


def test_policy_folder_without_processors_says_what_to_save(tmp_path):
    from qvla_compiler.eval.libero.policy import LiberoPolicyError, load_libero_policy

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(LiberoPolicyError, match="policy_preprocessor.json"):
        load_libero_policy(tmp_path)


def test_missing_simulator_names_the_install_command(monkeypatch):
    import sys

    from qvla_compiler.eval.libero.env import INSTALL_COMMAND, LiberoNotInstalledError, import_libero

    monkeypatch.setitem(sys.modules, "libero", None)
    monkeypatch.setitem(sys.modules, "libero.libero", None)
    with pytest.raises(LiberoNotInstalledError, match=r"\[libero\]") as info:
        import_libero()
    assert INSTALL_COMMAND in str(info.value)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--suite", "libero"], "pass --lerobot DIR"),
    (["eval", "--suite", "tabletop", "--jobs", "2"], "--jobs only apply to --suite libero"),
    (["eval", "--suite", "libero", "--lerobot", "{tmp}", "--save-video", "{tmp}/v.mp4"], "ending in .gif"),
    (["eval", "--suite", "libero", "--lerobot", "{tmp}", "--episodes", "0"], "--episodes must be at least 1"),
])
def test_cli_usage_errors(argv, message, tmp_path, capsys):
    from qvla_compiler import cli

    (tmp_path / "config.json").write_text("{}")
    code = cli.main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and out["error"] == "UsageError" and message in out["message"]


def test_calibration_never_uses_an_evaluated_init_state():
    from qvla_compiler.eval.libero.evaluate import calibration_sources

    tasks = [("libero_spatial", 0, "a"), ("libero_object", 3, "b")]
    assert calibration_sources(tasks, episodes=2, n_obs=4) == [
        ("libero_spatial", 0, 49), ("libero_object", 3, 49), ("libero_spatial", 0, 48), ("libero_object", 3, 48)]
    assert calibration_sources(tasks, episodes=49, n_obs=3)[2] == ("libero_90", 0, 49)  # held-out ones run out
    every = [("libero_90", t, "") for t in range(90)]
    assert calibration_sources(every, episodes=49, n_obs=90) == [("libero_90", t, 49) for t in range(90)]
    with pytest.raises(QvlaError, match="lower calib_steps or episodes"):
        calibration_sources(every, episodes=49, n_obs=91)


def test_table_names_every_task_and_suite():
    import io

    from rich.console import Console

    from qvla_compiler.eval.libero.report import print_libero, summarize_pairs

    rows = [_row("libero_goal", t, e, fp=True, q=e == 0) for t in (3, 5) for e in range(2)]
    r = {**summarize_pairs(rows, ["libero_goal"]), "policy": "tiny", "recipe": "w8a8", "layout": "quantvla",
         "episodes_per_task": 2, "env_steps": 88, "seconds_per_step": 0.3, "seconds_per_episode": 3.3, "seconds": 30}
    buf = io.StringIO()
    print_libero(r, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "libero_goal/3 t3" in text and "libero_goal/5 t5" in text and "w8a8 (layout quantvla)" in text
    assert "4 paired episodes: float 100%, quantized 50%" in text
