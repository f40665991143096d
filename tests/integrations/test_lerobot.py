"""lerobot policies wrapped as qvla policies (qvla_compiler.integrations.lerobot), on tiny random-weight builds.

Per policy kind (pi0.5, pi0, SmolVLA): the `none` program is bit-identical to lerobot's own sampler; W8A8 with the
quantvla layout makes the backbone linears and the action expert's MLPs integer and keeps the expert's attention
projections float, with actions within 5% (rel-L2); pi0.5's program saves and loads. Each quantize call exports two
graphs (~30–45 s on two busy cores), so every program is built once per module.
"""
import functools

import pytest
import torch

pytestmark = pytest.mark.lerobot

KINDS = ["pi05", "pi0", "smolvla"]
OBS = ("images", "tokens", "token_mask", "state")


@functools.lru_cache(maxsize=None)
def wrapped(kind):
    from qvla_compiler.integrations.lerobot import wrap
    from qvla_compiler.integrations.lerobot_tiny import build_tiny

    return wrap(build_tiny(kind, seed=0))


@functools.lru_cache(maxsize=None)
def quantized(kind, recipe, layout):
    import qvla_compiler

    w = wrapped(kind)
    return qvla_compiler.quantize(w, w.example_inputs(), w.calibration_batches(4, seed=1),
                                  recipe=w.recipe(recipe, layout), progress=False)


def fresh_obs(w, batch=3, seed=7):
    """An observation the program was not captured or calibrated on, with another batch size."""
    return next(iter(w.calibration_batches(1, seed=seed, batch=batch)))


@pytest.mark.parametrize("kind", KINDS)
def test_layout_none_is_bit_identical_to_lerobot(kind):
    w = wrapped(kind)
    qp = quantized(kind, "w8a8", "none")
    assert qp.report.int_linears == 0
    obs, noise = fresh_obs(w), w.example_noise(3, seed=5)
    out = qp.module()(*(obs[k] for k in OBS), noise)
    # lerobot's core sampler (all max_action_dim columns) ...
    assert torch.equal(out, w.sample_actions(**obs, noise=noise))
    # ... and lerobot's public policy API on the equivalent batch dict (action_dim columns)
    with torch.no_grad():
        chunk = w.policy.predict_action_chunk(w.to_lerobot_batch(*(obs[k] for k in OBS)), noise=noise)
    assert torch.equal(w.to_lerobot_actions(out), chunk)


@pytest.mark.parametrize("kind", KINDS)
def test_w8a8_quantvla_layout(kind):
    qp = quantized(kind, "w8a8", "quantvla")
    rows = qp.report.linears
    # the language backbone's attention and MLP linears (SmolVLA's state_proj also lands in the prefix graph's
    # backbone region; as a projection (`other`) it stays float, as in QuantVLA's layout)
    backbone = [r for r in rows if r.graph == "prefix" and r.region == "backbone" and r.role != "other"]
    assert all(r.bits == "float" for r in rows if r.role == "other")
    expert_mlp = [r for r in rows if r.region == "action_head" and r.role == "mlp"]
    expert_attn = [r for r in rows if r.region == "action_head" and r.role.startswith("attn")]
    assert backbone and all(r.bits == "W8A8" for r in backbone), [(r.module_path, r.bits) for r in backbone]
    assert expert_mlp and all(r.bits == "W8A8" for r in expert_mlp)
    assert expert_attn and all(r.bits == "float" for r in expert_attn)
    assert all(r.bits == "float" for r in rows if r.region == "vision")
    # names agree with what the graph-structure classification found
    assert all(".mlp." in r.module_path for r in expert_mlp)
    assert all(".self_attn." in r.module_path for r in expert_attn)
    assert 0 < qp.report.action_rel_l2 < 0.05
    assert qp.report.bytes_quant < qp.report.bytes_bf16


def test_recipe_adds_no_overrides_where_structure_suffices():
    from qvla_compiler.recipes import resolve_recipe

    assert wrapped("pi05").recipe("w8a8") == resolve_recipe("w8a8")
    assert wrapped("smolvla").recipe("w4a8", "strict") == resolve_recipe("w4a8", "strict")


def test_save_and_load_pi05(tmp_path):
    import qvla_compiler

    w = wrapped("pi05")
    qp = quantized("pi05", "w8a8", "quantvla")
    path = qp.save(tmp_path / "pi05-lerobot-w8a8.pt2")
    loaded = qvla_compiler.load(path)
    assert loaded.report.summary() == qp.report.summary()
    obs, noise = fresh_obs(w), w.example_noise(3, seed=5)
    args = (*(obs[k] for k in OBS), noise)
    assert torch.equal(loaded.module()(*args), qp.module()(*args))


# ------------------------------------------------------------------------------------- cheap checks (no export)
@pytest.mark.parametrize("kind", KINDS)
def test_schedule_is_lerobots_euler_loop(kind):
    w = wrapped(kind)
    cfg = w.policy.config
    steps = cfg.num_steps if kind == "smolvla" else cfg.num_inference_steps
    dt = -1.0 / steps
    assert w.schedule.dt == dt
    assert w.schedule.timesteps == tuple(1.0 + k * dt for k in range(steps))


@pytest.mark.parametrize("kind", KINDS)
def test_observation_round_trip(kind):
    w = wrapped(kind)
    obs = w.example_inputs(batch=2)
    batch = w.to_lerobot_batch(*(obs[k] for k in OBS))
    assert set(w.cameras) <= set(batch) and all(batch[c].shape == (2, *w.image_shape) for c in w.cameras)
    back = w.from_lerobot_batch(batch)
    assert all(torch.equal(back[k], obs[k]) for k in OBS)


def test_wrap_refuses_other_objects():
    from qvla_compiler.errors import QvlaError
    from qvla_compiler.integrations.lerobot import UnsupportedLerobotPolicyError, wrap

    with pytest.raises(UnsupportedLerobotPolicyError, match="PI05Policy") as info:
        wrap(torch.nn.Linear(2, 2))
    assert isinstance(info.value, QvlaError)
    with pytest.raises(UnsupportedLerobotPolicyError, match="not their inner .model"):
        wrap(wrapped("pi05").policy.model)


def test_missing_camera_is_a_named_error():
    from qvla_compiler.integrations.lerobot import LerobotObservationError

    w = wrapped("pi05")
    batch = w.to_lerobot_batch(*(w.example_inputs()[k] for k in OBS))
    del batch[w.cameras[1]]
    with pytest.raises(LerobotObservationError, match=w.cameras[1]):
        w.from_lerobot_batch(batch)


def test_missing_lerobot_module_names_the_install_command():
    from qvla_compiler.integrations.lerobot import INSTALL_COMMAND, LerobotNotInstalledError, _import

    with pytest.raises(LerobotNotInstalledError, match=INSTALL_COMMAND):
        _import("lerobot.policies.no_such_policy")


def test_load_pretrained_folder(tmp_path):
    """A policy folder written by lerobot's save_pretrained loads offline and samples the same actions."""
    from qvla_compiler.integrations.lerobot import load_pretrained
    from qvla_compiler.integrations.lerobot_tiny import tiny_sizes

    w = wrapped("pi05")
    w.policy.save_pretrained(tmp_path)
    with tiny_sizes("pi05"):
        loaded = load_pretrained(tmp_path)
    obs, noise = w.example_inputs(), w.example_noise(2)
    assert torch.equal(loaded.sample_actions(**obs, noise=noise), w.sample_actions(**obs, noise=noise))


@pytest.mark.parametrize("kind", ["pi05", "smolvla"])
def test_cameras_of_another_size_go_through_lerobots_resize(kind):
    """Cameras whose size differs from the model's input are resized-with-pad by lerobot's own preprocessing inside
    embed_prefix; the prefix/denoise split still reproduces lerobot's sampler exactly (eager, no export)."""
    from qvla_compiler.integrations.lerobot import wrap
    from qvla_compiler.integrations.lerobot_tiny import CAMERAS, build_tiny, tiny_config
    from qvla_compiler.models.sampling import euler_sample

    features = dict(tiny_config(kind).input_features)
    for cam in CAMERAS:
        features[cam] = type(features[cam])(type=features[cam].type, shape=(3, 40, 48))
    w = wrap(build_tiny(kind, seed=3, input_features=features))
    assert w.image_shape == (3, 40, 48)
    obs, noise = w.example_inputs(), w.example_noise(2, seed=2)
    with torch.no_grad():
        split = euler_sample(w.embed_prefix, w.denoise_step, obs, noise, w.schedule)
    assert torch.equal(split, w.sample_actions(**obs, noise=noise))


def test_real_time_chunking_is_refused_with_the_fix():
    from qvla_compiler.integrations.lerobot import LerobotObservationError, _import, wrap
    from qvla_compiler.integrations.lerobot_tiny import build_tiny

    rtc = _import("lerobot.policies.rtc.configuration_rtc").RTCConfig(enabled=True)
    with pytest.raises(LerobotObservationError, match="rtc_config.enabled=False"):
        wrap(build_tiny("pi05", rtc_config=rtc))


def test_cli_quantizes_a_lerobot_folder(tmp_path, capsys):
    """`qvla quantize --lerobot DIR` (in-process: the tiny sizes are patched in for the load)."""
    import json

    from qvla_compiler import cli
    from qvla_compiler.integrations.lerobot_tiny import tiny_sizes

    wrapped("pi05").policy.save_pretrained(tmp_path / "pi05")
    with tiny_sizes("pi05"):
        code = cli.main(["quantize", "--lerobot", str(tmp_path / "pi05"), "--recipe", "w8a8", "--calib-steps", "2",
                         "--no-save", "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["model"] == "lerobot-pi05" and summary["int_linears"] > 0
    assert summary["regions"]["action_head"]["int"] > 0 and summary["action_rel_l2"] < 0.05
