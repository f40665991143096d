"""`qvla eval --suite libero` end to end: the real LIBERO simulator and a tiny random-weight lerobot π0.5.

Success means nothing with random weights; the tests check the mechanics: float rollouts are bit-identical when
re-run (in another call, in worker processes, on Ray), layout `none` diverges by exactly 0, W8A8 by a small nonzero
amount, the episode bookkeeping and JSON keys, and the side-by-side video. Episodes are capped at 10 steps (2 policy
calls) to keep the module to a few minutes. Needs the simulator and lerobot 0.6.1; deselected by default (marker
`libero`): `python -m pytest -q -m libero tests/eval/test_libero.py`.
"""
import contextlib
import importlib.util
import io
import json

import pytest

from qvla_compiler.eval.libero.env import INSTALL_COMMAND, libero_available

_LEROBOT = importlib.util.find_spec("lerobot") is not None
pytestmark = [
    pytest.mark.libero,
    pytest.mark.skipif(not libero_available(), reason=f"LIBERO is not installed; install it with {INSTALL_COMMAND}"),
    pytest.mark.skipif(not _LEROBOT, reason="lerobot 0.6.1 is not installed; `bash scripts/install_lerobot.sh`"),
]

TASKS = "libero_spatial/0,libero_object/0"
COMMON = dict(tasks=TASKS, episodes=2, max_steps=10, calib_steps=1, progress=False)
DIVERGENCE = ("action_l2", "action_rel_l2", "ee_mean_m", "ee_max_m", "ee_final_m")


def rows(result):
    return {(s, int(t), e["episode"]): e for s, suite in result["per_suite"].items()
            for t, task in suite["per_task"].items() for e in task["episodes_list"]}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from qvla_compiler.eval.libero.tiny import write_tiny_libero_policy

    return str(write_tiny_libero_policy(tmp_path_factory.mktemp("tiny") / "pi05-libero"))


@pytest.fixture(scope="module")
def w8a8(folder, tmp_path_factory):
    """The done-criterion command, in process: 2 tasks x 2 episodes, W8A8, JSON, video."""
    from qvla_compiler import cli

    video = tmp_path_factory.mktemp("video") / "side_by_side.gif"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["eval", "--suite", "libero", "--lerobot", folder, "--recipe", "w8a8", "--tasks", TASKS,
                         "--episodes", "2", "--max-steps", "10", "--calib-steps", "1", "--save-video", str(video),
                         "--json"])
    assert code == 0
    return json.loads(out.getvalue()), video


def test_json_has_success_intervals_p_values_and_divergence_per_task(w8a8):
    r, _ = w8a8
    assert r["suite"] == "libero" and r["recipe"] == "w8a8" and r["layout"] == "quantvla"
    assert r["episodes"] == 4 and set(r["per_suite"]) == {"libero_spatial", "libero_object"}
    for suite in r["per_suite"].values():
        (task,) = suite["per_task"].values()
        for key in ("success_fp", "success_q", "ci_fp", "ci_q", "p_value", "episodes", *DIVERGENCE,
                    "separated", "separation_step_median", "episodes_list"):
            assert key in task, key
        assert 0 <= task["ci_fp"][0] <= task["success_fp"] <= task["ci_fp"][1] <= 1 and 0 <= task["p_value"] <= 1
    assert r["report"]["int_linears"] > 0 and r["calibration"]["observations"] == 2
    # calibration init states come from the end of each task's list, disjoint from the evaluated ones (0, 1)
    assert all(state >= 2 for _, _, state in r["calibration"]["init_states"])
    assert r["env_steps"] == sum(e["steps_fp"] + e["steps_q"] for e in rows(r).values())
    assert r["seconds_per_step"] > 0 and r["seconds_per_episode"] > 0


def test_episode_bookkeeping(w8a8):
    r, _ = w8a8
    eps = rows(r)
    assert sorted(eps) == [(s, 0, e) for s in ("libero_object", "libero_spatial") for e in (0, 1)]
    for e in eps.values():
        for side in ("fp", "q"):
            steps, calls = e[f"steps_{side}"], e[f"calls_{side}"]
            assert 1 <= steps <= 10 and calls == -(-steps // r["n_action_steps"])
            assert e[f"success_{side}"] or steps == 10


def test_w8a8_divergence_is_small_and_nonzero(w8a8):
    r, _ = w8a8
    for e in rows(r).values():
        assert 0 < e["action_rel_l2"] < 0.05 and e["action_cos"] > 0.99
        assert 0 < e["ee_max_m"] < 0.02
        assert e["digest_fp"] != e["digest_q"]  # the quantized rollout really is another rollout


def test_video_is_written_and_its_episodes_reproduce(w8a8):
    from PIL import Image

    r, video = w8a8
    assert video.is_file() and r["video"] == str(video)
    assert len(r["video_episodes"]) == 2 and all(m["reproduced"] for m in r["video_episodes"])
    with Image.open(video) as gif:
        assert gif.n_frames >= 4 and gif.size[0] > 2 * gif.size[1] * 0.8  # two panels side by side


def test_layout_none_diverges_by_exactly_zero_and_float_reruns_are_bit_identical(folder, w8a8):
    from qvla_compiler.eval.libero import evaluate_libero

    r = evaluate_libero(folder, "w8a8", layout="none", **COMMON)
    assert r["layout"] == "none" and r["report"]["int_linears"] == 0
    assert r["report"]["action_sqnr_db"] is None and json.dumps(r, allow_nan=False)  # strict JSON
    first = rows(w8a8[0])
    for key, e in rows(r).items():
        assert e["digest_q"] == e["digest_fp"]                         # quantized rollout == float rollout
        assert all(e[k] == 0.0 for k in DIVERGENCE) and e["separation_step"] is None
        assert e["digest_fp"] == first[key]["digest_fp"]               # float rollout == the other run's


def test_worker_processes_give_the_same_results(folder, w8a8):
    from qvla_compiler.eval.libero import evaluate_libero

    r = evaluate_libero(folder, "w8a8", jobs=2, **COMMON)
    first = rows(w8a8[0])
    for key, e in rows(r).items():
        drop = {"seconds_fp", "seconds_q"}
        assert {k: v for k, v in e.items() if k not in drop} == {k: v for k, v in first[key].items() if k not in drop}


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed: pip install ray")
def test_ray_tasks_give_the_same_float_rollouts(folder, w8a8):
    from qvla_compiler.eval.libero import evaluate_libero

    r = evaluate_libero(folder, "float", jobs=2, ray_address="local", **COMMON)
    first = rows(w8a8[0])
    assert r["recipe"] == "float" and r["p_value"] == 1.0
    assert {k: e["digest_fp"] for k, e in rows(r).items()} == {k: e["digest_fp"] for k, e in first.items()}
