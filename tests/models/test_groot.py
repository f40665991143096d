"""GR00T N1.5 reference policy (tiny preset): shapes, sampling, dependence on inputs, padding, export, graph contents."""

from collections import Counter

import pytest
import torch
from torch import nn
from torch.export import Dim, export

from qvla_compiler.models import FlowSchedule, GrootPolicy, build_policy, euler_sample, get_config

NAME = "groot-tiny"


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
        x_t, t = policy.example_noise(batch=2), torch.full((2,), 0.25)
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
        vl, vl_mask, state_features = policy.embed_prefix(**obs)
    seq = cfg.vision.num_patches + cfg.max_tokens
    assert vl.shape == (3, seq, cfg.width)
    assert vl_mask.shape == (3, seq) and vl_mask.dtype == torch.bool
    assert torch.equal(vl_mask[:, cfg.vision.num_patches :], obs["token_mask"])
    assert state_features.shape == (3, 1, cfg.dit_width)
    actions = policy.sample_actions(**obs, noise=policy.example_noise(batch=3))
    assert actions.shape == (3, cfg.horizon, cfg.action_dim)
    assert torch.isfinite(actions).all() and actions.std() > 0.1


def test_structure_names(policy):
    names = dict(policy.named_modules())
    for name in [
        "vision.patch_embed", "vision.layers.1.self_attn.q_proj", "mlp1", "language_model.embed_tokens",
        "language_model.layers.1.self_attn.q_norm", "language_model.layers.0.self_attn.k_norm",
        "language_model.layers.0.mlp.down_proj", "state_encoder.layer1", "state_encoder.layer2", "action_head.vlln",
        "action_head.timestep_encoder.linear_2", "action_head.action_encoder.W3", "action_head.position_embedding",
        "action_head.future_tokens", "action_head.transformer_blocks.3.norm1.linear",
        "action_head.transformer_blocks.0.attn1.to_out.0", "action_head.transformer_blocks.1.ff.net.0.proj",
        "action_head.transformer_blocks.2.ff.net.2", "action_head.proj_out_1", "action_head.norm_out",
        "action_head.proj_out_2", "action_head.action_decoder.layer1", "action_head.action_decoder.layer2",
    ]:
        assert name in names, name
    assert "language_model.norm" not in names  # truncated Qwen3: no final norm
    cfg = policy.config
    blocks = policy.action_head.transformer_blocks
    assert cfg.dit_width == 96
    assert blocks[0].attn1.to_k.in_features == cfg.width and blocks[1].attn1.to_k.in_features == cfg.dit_width
    assert isinstance(blocks[0].attn1.to_out[1], nn.Dropout) and isinstance(blocks[0].ff.net[1], nn.Dropout)
    attn = policy.language_model.layers[0].self_attn  # GQA
    assert attn.k_proj.out_features == cfg.kv_heads * cfg.head_dim < attn.q_proj.out_features
    assert blocks[0].norm1.linear.weight.abs().max() > 0  # AdaLN modulation is not zero-initialised


def test_schedule():
    schedule = build_policy(NAME).schedule
    assert schedule.timesteps == (0.0, 0.25, 0.5, 0.75) and schedule.dt == 0.25
    assert schedule == FlowSchedule.uniform(0.0, 1.0, 4)


def test_deterministic_given_noise_and_seed(policy):
    obs, noise = policy.example_inputs(), policy.example_noise()
    first = policy.sample_actions(**obs, noise=noise)
    assert torch.equal(first, policy.sample_actions(**obs, noise=noise))
    assert torch.equal(first, build_policy(NAME, seed=0).sample_actions(**obs, noise=noise))
    assert not torch.allclose(first, build_policy(NAME, seed=1).sample_actions(**obs, noise=noise))


def test_sample_actions_is_the_manual_euler_loop(policy):
    obs, x = policy.example_inputs(), policy.example_noise()
    with torch.no_grad():
        prefix = policy.embed_prefix(**obs)
        for step in range(4):
            x = x + 0.25 * policy.denoise_step(prefix, x, torch.full((2,), 0.25 * step))
        generic = euler_sample(policy.embed_prefix, policy.denoise_step, obs, policy.example_noise(), policy.schedule)
    sampled = policy.sample_actions(**obs, noise=policy.example_noise())
    torch.testing.assert_close(sampled, x, rtol=1e-6, atol=1e-6)
    assert torch.equal(sampled, generic)


def test_time_is_bucketed_to_thousandths(policy):
    obs, x = policy.example_inputs(), policy.example_noise()
    with torch.no_grad():
        prefix = policy.embed_prefix(**obs)
        v = policy.denoise_step(prefix, x, torch.full((2,), 0.5))
        assert torch.equal(v, policy.denoise_step(prefix, x, torch.full((2,), 0.5004)))  # floor(500.4) = 500
        assert not torch.equal(v, policy.denoise_step(prefix, x, torch.full((2,), 0.501)))


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


@pytest.mark.parametrize("batch", [2, 3])
def test_export_matches_eager(policy, exported, batch):
    ep_prefix, ep_denoise = exported
    obs = policy.example_inputs(batch=batch)
    x_t, t = policy.example_noise(batch=batch, seed=1), torch.full((batch,), 0.75)
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
    assert {n.split(".")[0] for n in prefix_linears} == {"vision", "mlp1", "language_model", "state_encoder"}
    assert {n.split(".")[0] for n in denoise_linears} == {"action_head"}
    assert len(prefix_linears) == 29 and len(denoise_linears) == 37


def test_attention_is_sdpa(decomposed):
    for ep, n_sdpa in zip(decomposed, (4, 4)):  # vision 2 + LM 2 layers; 4 DiT blocks
        ops = _ops(ep)
        assert ops["aten.scaled_dot_product_attention.default"] == n_sdpa
        assert not any("softmax" in op for op in ops)


def test_config_arithmetic_of_small_and_full():
    def build_on_meta(name):
        with torch.device("meta"):
            return GrootPolicy(get_config(name))

    small = sum(p.numel() for p in build_on_meta("groot-small").parameters())
    assert 30e6 < small < 100e6  # 36.9M
    head = build_on_meta("groot-full").action_head
    dit = [head.transformer_blocks, head.timestep_encoder, head.proj_out_1, head.proj_out_2]
    # architectures.md 4.1: DiT 550.4M; cross blocks map the 2048-wide VL features to the 1536-wide inner dim
    assert sum(p.numel() for m in dit for p in m.parameters()) / 1e6 == pytest.approx(550.4, abs=0.5)
    assert head.transformer_blocks[0].attn1.to_k.weight.shape == (1536, 2048)
    assert head.transformer_blocks[1].attn1.to_k.weight.shape == (1536, 1536)
    assert head.transformer_blocks[0].ff.net[0].proj.weight.shape == (6144, 1536)
