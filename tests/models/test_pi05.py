"""pi0.5 reference policy (tiny preset): shapes, sampling, dependence on inputs, padding, export, graph contents."""

from collections import Counter

import pytest
import torch
from torch import nn
from torch.export import Dim, export

from qvla_compiler.models import FlowSchedule, Pi05Policy, build_policy, euler_sample, get_config

NAME = "pi05-tiny"


class _Prefix(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, images, tokens, token_mask, state):
        return self.policy.embed_prefix(images, tokens, token_mask, state)


class _Denoise(nn.Module):
    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, prefix, x_t, t):
        return self.policy.denoise_step(prefix, x_t, t)


@pytest.fixture(scope="module")
def policy():
    return build_policy(NAME, seed=0)


@pytest.fixture(scope="module")
def exported(policy):
    """(prefix program, denoise program), both with a dynamic batch dimension on every input."""
    batch = Dim("batch", min=1, max=64)
    obs = policy.example_inputs(batch=2)
    with torch.no_grad():
        prefix = policy.embed_prefix(**obs)
        x_t, t = policy.example_noise(batch=2), torch.full((2,), 0.3)
        ep_prefix = export(_Prefix(policy), (), obs, dynamic_shapes={k: {0: batch} for k in obs}, strict=False)
        shapes = (tuple({0: batch} for _ in prefix), {0: batch}, {0: batch})
        ep_denoise = export(_Denoise(policy), (prefix, x_t, t), dynamic_shapes=shapes, strict=False)
    return ep_prefix, ep_denoise


@pytest.fixture(scope="module")
def decomposed(exported):
    """The exported programs with an empty decomposition table: every nn.Linear stays one aten.linear."""
    return tuple(ep.run_decompositions(decomp_table={}) for ep in exported)


def _linear_targets(ep):
    return [
        list(n.meta["nn_module_stack"].values())[-1][0].removeprefix("policy.")
        for n in ep.graph.nodes
        if n.target is torch.ops.aten.linear.default
    ]


def _ops(ep):
    return Counter(str(n.target) for n in ep.graph.nodes if n.op == "call_function")


def test_prefix_and_action_shapes(policy):
    cfg = policy.config
    obs = policy.example_inputs(batch=3)
    with torch.no_grad():
        k, v, mask, hidden = policy.embed_prefix(**obs)
    seq = cfg.vision.num_patches + cfg.max_tokens + cfg.state_dim
    assert k.shape == v.shape == (3, cfg.layers, seq, cfg.head_dim)
    assert mask.shape == (3, seq) and mask.dtype == torch.bool
    assert hidden.shape == (3, seq, cfg.width)
    actions = policy.sample_actions(**obs, noise=policy.example_noise(batch=3))
    assert actions.shape == (3, cfg.horizon, cfg.action_dim)
    assert torch.isfinite(actions).all() and actions.std() > 0.1


def test_structure_names(policy):
    names = dict(policy.named_modules())
    for name in [
        "vision.patch_embed", "vision.layers.1.self_attn.out_proj", "vision.layers.0.mlp.fc2", "vision.post_layernorm",
        "multi_modal_projector", "language_model.embed_tokens", "language_model.layers.1.self_attn.o_proj",
        "language_model.layers.0.mlp.gate_proj", "language_model.norm", "action_expert.layers.1.input_layernorm.dense",
        "action_expert.layers.0.post_attention_layernorm.dense", "action_expert.norm.dense", "action_in_proj",
        "time_mlp_in", "time_mlp_out", "action_out_proj",
    ]:
        assert name in names, name
    cfg = policy.config
    attn = policy.action_expert.layers[0].self_attn  # MQA: one KV head of head_dim
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (
        cfg.heads * cfg.head_dim, cfg.head_dim, cfg.head_dim)
    assert policy.vision.layers[0].self_attn.q_proj.bias is not None
    assert policy.language_model.layers[0].self_attn.q_proj.bias is None
    assert policy.action_expert.layers[0].input_layernorm.dense.weight.abs().max() > 0  # not zero-initialised


def test_schedule():
    schedule = build_policy(NAME).schedule
    assert schedule.timesteps == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    assert schedule.dt == pytest.approx(-0.1)
    assert schedule == FlowSchedule.uniform(1.0, 0.0, 10)


def test_deterministic_given_noise_and_seed(policy):
    obs, noise = policy.example_inputs(), policy.example_noise()
    first = policy.sample_actions(**obs, noise=noise)
    assert torch.equal(first, policy.sample_actions(**obs, noise=noise))
    assert torch.equal(first, build_policy(NAME, seed=0).sample_actions(**obs, noise=noise))
    assert not torch.allclose(first, build_policy(NAME, seed=1).sample_actions(**obs, noise=noise))
    assert torch.equal(obs["images"], policy.example_inputs()["images"])


def test_sample_actions_is_the_manual_euler_loop(policy):
    obs, x = policy.example_inputs(), policy.example_noise()
    with torch.no_grad():
        prefix = policy.embed_prefix(**obs)
        for step in range(10):
            x = x - 0.1 * policy.denoise_step(prefix, x, torch.full((2,), 1.0 - 0.1 * step))
        generic = euler_sample(policy.embed_prefix, policy.denoise_step, obs, policy.example_noise(), policy.schedule)
    sampled = policy.sample_actions(**obs, noise=policy.example_noise())
    torch.testing.assert_close(sampled, x, rtol=1e-6, atol=1e-6)
    assert torch.equal(sampled, generic)


def test_velocity_depends_on_xt_t_and_observation(policy):
    obs, x = policy.example_inputs(), policy.example_noise()
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        prefix = policy.embed_prefix(**obs)
        v = policy.denoise_step(prefix, x, t)
        variants = {
            "x_t": policy.denoise_step(prefix, x + 0.5, t),
            "t": policy.denoise_step(prefix, x, t - 0.3),
            "images": policy.denoise_step(policy.embed_prefix(**{**obs, "images": obs["images"].flip(-1)}), x, t),
            "tokens": policy.denoise_step(policy.embed_prefix(**{**obs, "tokens": obs["tokens"].flip(-1)}), x, t),
            "state": policy.denoise_step(policy.embed_prefix(**{**obs, "state": -obs["state"]}), x, t),
        }
    for name, other in variants.items():
        assert (other - v).norm() / v.norm() > 1e-3, name


def test_padding_tokens_are_ignored(policy):
    obs = next(policy.calibration_batches(1, seed=3))
    assert not obs["token_mask"].all()
    repadded = {**obs, "tokens": torch.where(obs["token_mask"], obs["tokens"], 77)}
    noise = policy.example_noise()
    torch.testing.assert_close(
        policy.sample_actions(**repadded, noise=noise), policy.sample_actions(**obs, noise=noise), rtol=0, atol=1e-6
    )


def test_calibration_batches(policy):
    batches = list(policy.calibration_batches(3, seed=5, batch=4))
    assert len(batches) == 3
    for b in batches:
        assert b["images"].shape == (4, 3, 32, 32) and 0 <= b["images"].min() and b["images"].max() <= 1
        assert b["tokens"].dtype == torch.int64 and b["tokens"].shape == (4, policy.config.max_tokens)
        assert (b["tokens"][~b["token_mask"]] == 0).all() and b["token_mask"][:, 0].all()
    assert torch.equal(batches[0]["images"], next(policy.calibration_batches(1, seed=5, batch=4))["images"])


@pytest.mark.parametrize("batch", [2, 3])
def test_export_matches_eager(policy, exported, batch):
    ep_prefix, ep_denoise = exported
    obs = policy.example_inputs(batch=batch)
    x_t, t = policy.example_noise(batch=batch, seed=1), torch.full((batch,), 0.7)
    with torch.no_grad():
        eager_prefix = policy.embed_prefix(**obs)
        graph_prefix = ep_prefix.module()(**obs)
        for a, b in zip(eager_prefix, graph_prefix, strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        expected = policy.denoise_step(eager_prefix, x_t, t)
        torch.testing.assert_close(ep_denoise.module()(eager_prefix, x_t, t), expected, rtol=0, atol=1e-6)


def test_every_linear_is_an_aten_linear(policy, decomposed):
    linears = Counter(n for n, m in policy.named_modules() if isinstance(m, nn.Linear))
    prefix_linears, denoise_linears = (_linear_targets(ep) for ep in decomposed)
    assert Counter(prefix_linears + denoise_linears) == linears
    assert all(n.startswith(("vision.", "multi_modal_projector", "language_model.")) for n in prefix_linears)
    assert len(prefix_linears) == 27 and len(denoise_linears) == 23


def test_attention_is_explicit_softmax(decomposed):
    for ep, n_softmax in zip(decomposed, (4, 2)):  # vision 2 + LM 2 layers; expert 2 layers
        ops = _ops(ep)
        assert ops["aten.softmax.int"] == n_softmax
        assert not any("scaled_dot_product" in op for op in ops)


def test_config_arithmetic_of_small_and_full():
    def count(name):
        with torch.device("meta"):
            return Pi05Policy(get_config(name))

    small = sum(p.numel() for p in count("pi05-small").parameters())
    assert 30e6 < small < 100e6  # 35.6M
    full = count("pi05-full")
    millions = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in full.named_children()}
    # architectures.md 2.2: SigLIP 412.4M, projector 2.4M, expert 427.9M, Gemma-2B 2508.5M at vocab 257152
    assert millions["vision"] == pytest.approx(412.4, abs=0.1)
    assert millions["multi_modal_projector"] == pytest.approx(2.4, abs=0.1)
    assert millions["action_expert"] == pytest.approx(427.9, abs=0.1)
    assert millions["language_model"] + (257152 - 32000) * 2048 / 1e6 == pytest.approx(2508.5, abs=0.1)
    assert full.config.prefix_len == 256 + 200 + 32
