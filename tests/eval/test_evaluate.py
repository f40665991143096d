"""evaluate(): keys, float-vs-float sanity, a tiny quantized run, the GIF. CPU, a few episodes, no training."""

import math

import pytest

from qvla_compiler.errors import QvlaError
from qvla_compiler.eval.evaluate import calibration_observations, evaluate
from qvla_compiler.models import build_policy

KEYS = {"success_fp", "success_q", "ci_fp", "ci_q", "p_value", "episodes", "action_divergence", "per_family"}


@pytest.fixture(scope="module")
def policy():
    # random weights: these tests check the plumbing, not the success rate (and need no checkpoint)
    return build_policy("pi05-tabletop", seed=0, pretrained=False)


def test_float_vs_float_is_identical(policy):
    r = evaluate("pi05-tabletop", "none", episodes=2, families=["reach", "push"], progress=False, policy=policy)
    assert KEYS <= set(r)
    assert r["p_value"] == 1.0 and r["action_divergence"] == 0.0
    assert r["success_fp"] == r["success_q"] and r["episodes"] == 4
    assert set(r["per_family"]) == {"reach", "push"}
    for f in ("reach", "push"):
        assert r[f"success_fp_{f}"] == r[f"success_q_{f}"]


def test_quantized_run_returns_the_keys(policy, tmp_path):
    gif = tmp_path / "ep.gif"
    r = evaluate("pi05-tabletop", "w8a8", episodes=2, families=["reach"], calib_steps=2, progress=False,
                 policy=policy, save_video=str(gif), video_episodes=1)
    assert KEYS <= set(r) and r["episodes"] == 2
    assert 0.0 <= r["success_q"] <= 1.0 and 0.0 <= r["p_value"] <= 1.0
    assert r["ci_q"][0] <= r["success_q"] <= r["ci_q"][1]
    assert math.isfinite(r["action_divergence"]) and r["action_divergence"] >= 0.0
    assert r["report"]["int_linears"] > 0
    assert gif.is_file() and gif.read_bytes()[:6] in (b"GIF89a", b"GIF87a")


def test_calibration_observations_shapes(policy):
    batches = calibration_observations(policy, 3, batch=4)
    assert len(batches) == 3
    cfg = policy.config
    b = batches[0]
    assert b["images"].shape == (4, 3, cfg.image_size, cfg.image_size)
    assert b["tokens"].shape == (4, cfg.max_tokens) and b["state"].shape == (4, cfg.state_dim)


def test_rejects_bad_arguments(policy):
    with pytest.raises(QvlaError):
        evaluate("pi05-tabletop", "none", episodes=0, policy=policy, progress=False)
    with pytest.raises(QvlaError):
        evaluate("pi05-tabletop", "none", episodes=1, families=["stack"], policy=policy, progress=False)
