"""Model registry: names, seeding, error on unknown names, and the FlowSchedule / tiny-size contracts."""

import pytest
import torch

from qvla_compiler.errors import ModelNotFoundError, QvlaError, UsageError
from qvla_compiler.models import MODEL_NAMES, FlowSchedule, GrootPolicy, Pi05Policy, build_policy, get_config


def test_model_names():
    assert MODEL_NAMES == ("pi05-tiny", "pi05-small", "pi05-full", "groot-tiny", "groot-small", "groot-full",
                           "pi05-tabletop", "groot-tabletop")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ModelNotFoundError) as info:
        build_policy("pi0-huge")
    message = str(info.value)
    assert "pi0-huge" in message and all(name in message for name in MODEL_NAMES)
    assert isinstance(info.value, QvlaError) and isinstance(info.value, KeyError)


@pytest.mark.parametrize("name, cls", [("pi05-tiny", Pi05Policy), ("groot-tiny", GrootPolicy)])
def test_tiny_presets_are_small_fp32_eval(name, cls):
    policy = build_policy(name, seed=3)
    assert isinstance(policy, cls) and policy.config is get_config(name) and not policy.training
    params = list(policy.parameters())
    assert sum(p.numel() for p in params) <= 5_000_000  # pi05-tiny 0.55M, groot-tiny 1.15M
    assert all(p.dtype == torch.float32 for p in params)
    for attr in ("action_dim", "horizon", "max_tokens", "image_size", "state_dim"):
        assert isinstance(getattr(policy.config, attr), int)


def test_same_seed_same_weights():
    a, b, c = build_policy("groot-tiny", seed=7), build_policy("groot-tiny", seed=7), build_policy("groot-tiny", seed=8)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.mlp1.weight, c.mlp1.weight)


@pytest.mark.parametrize("name", ["pi05-tiny", "groot-tiny"])
def test_a_bf16_build_holds_only_bf16_and_takes_fp32_observations(name):
    """The full presets build in bf16 (half the memory): every weight is created in bf16, float inputs are cast on
    entry, and the actions come back in the noise's dtype, close to the fp32 build's."""
    fp32, bf16 = build_policy(name, seed=2), build_policy(name, seed=2, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.state_dict().values() if p.is_floating_point()} == {torch.bfloat16}
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    obs, noise = fp32.example_inputs(2), fp32.example_noise(2)
    want, got = fp32.sample_actions(**obs, noise=noise), bf16.sample_actions(**obs, noise=noise)
    assert got.dtype == torch.float32
    assert 0 < ((got - want).norm() / want.norm()).item() < 0.05  # bf16 rounding, not a different policy
    assert torch.get_default_dtype() == torch.float32  # the build restored the default


def test_build_dtype_is_checked():
    with pytest.raises(UsageError, match="dtype must be torch.float32 or torch.bfloat16"):
        build_policy("pi05-tiny", dtype=torch.float16)


def test_flow_schedule_validates():
    assert FlowSchedule.uniform(0.0, 1.0, 2) == FlowSchedule(timesteps=(0.0, 0.5), dt=0.5)
    with pytest.raises(QvlaError):
        FlowSchedule(timesteps=(), dt=0.1)
    with pytest.raises(QvlaError):
        FlowSchedule(timesteps=(1.0,), dt=0.0)
    with pytest.raises(QvlaError):
        FlowSchedule.uniform(1.0, 0.0, 0)


def test_pi05_state_tokens_sit_above_the_words():
    from qvla_compiler.eval.tokenizer import VOCAB_SIZE

    policy = build_policy("pi05-tabletop", pretrained=False)
    cfg = get_config("pi05-tabletop")
    ids = policy._state_tokens(torch.tensor([[-1.0, 1.0, 0.0]]))
    assert ids.tolist() == [[cfg.state_token_offset, cfg.state_token_offset + cfg.state_bins - 1,
                             cfg.state_token_offset + cfg.state_bins // 2]]
    assert cfg.state_token_offset >= VOCAB_SIZE and cfg.state_token_offset + cfg.state_bins <= cfg.vocab_size


@pytest.mark.parametrize("name", ["pi05-tabletop", "groot-tabletop"])
def test_pad_tokens_change_nothing(name):
    """The tabletop presets keep only 10 text tokens (pads cost compute); checkpoints trained with 16 still load and
    act the same, because padding is masked out of attention."""
    import dataclasses

    from qvla_compiler.eval.tokenizer import Tokenizer

    short = build_policy(name, seed=1, pretrained=False)
    cfg16 = dataclasses.replace(short.config, max_tokens=16)
    long = type(short)(cfg16)
    long.load_state_dict(short.state_dict())
    long.eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, cfg16.image_size, cfg16.image_size, generator=gen)
    state = torch.rand(2, cfg16.state_dim, generator=gen) * 2 - 1
    noise = torch.randn(2, cfg16.horizon, cfg16.action_dim, generator=gen)
    texts = ["touch the red circle and then the blue square", "reach the green triangle"]
    out = []
    for policy, n in ((short, 10), (long, 16)):
        tokens, mask = Tokenizer(max_len=n).encode_batch(texts)
        with torch.no_grad():
            out.append(policy.sample_actions(images, tokens, mask, state, noise=noise))
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=0)
    assert out[0].abs().max() > 0.01  # not a trivially zero output
