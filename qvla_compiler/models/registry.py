"""Named size presets of the reference policies and `build_policy(name, seed)`.

tiny: < 5M parameters, for unit tests. small: tens of millions, for fidelity experiments on CPU. full: the real
dimensions (architectures.md sections 2 and 4), with the vocabulary cut to 32000 rows (pi0.5 has 257152, Qwen3
151680) because the embedding is never quantized and would only cost memory.
"""

from __future__ import annotations

import torch

from qvla_compiler.errors import ModelNotFoundError, UsageError
from qvla_compiler.models.common import FlowPolicy, VisionConfig
from qvla_compiler.models.groot import GrootConfig, GrootPolicy
from qvla_compiler.models.pi05 import Pi05Config, Pi05Policy

_VISION_TINY = VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp=128)
_VISION_SMALL = VisionConfig(image_size=112, patch_size=16, width=256, layers=4, heads=4, mlp=1024)
_SIGLIP_SO400M = VisionConfig(image_size=224, patch_size=14, width=1152, layers=27, heads=16, mlp=4304)
# tabletop: sized to the closed-loop suite (qvla_compiler/eval: 64x64 images, 10 text tokens, state 8, actions 2) and to
# train on 2 CPU cores in <= 30 minutes (training/train_tabletop.py); trained weights in qvla_compiler/eval/checkpoints.
# 16-pixel patches keep 16 image tokens (the transformer costs what it did at 32x32 with 8-pixel patches) while shapes
# and positions get four times the pixels. pi05-tabletop has 2 query heads of 64 rather than 4 of 32: its expert reads
# the prefix only through the one shared KV head per layer, and 64 values per token instead of 32 trained to a lower
# flow loss and 76.5% instead of 71.3% float success at 8000 steps, one run each (benchmarks/RESULTS.md section 5b;
# pi05's seed spread is 7.5 points, so the loss is the firmer evidence). The committed command trains it for 7200
# steps (25 minutes; 8000 took 29 and 31: the edge of the budget; checkpoints README).
_VISION_TABLETOP = VisionConfig(image_size=64, patch_size=16, width=96, layers=2, heads=4, mlp=192)

PRESETS: dict[str, Pi05Config | GrootConfig] = {
    "pi05-tiny": Pi05Config(
        vision=_VISION_TINY, vocab_size=256, max_tokens=16, width=128, layers=2, heads=8, head_dim=16, mlp=256,
        expert_width=64, expert_mlp=128, horizon=10, action_dim=7, state_dim=8,
    ),
    "pi05-small": Pi05Config(
        vision=_VISION_SMALL, vocab_size=1024, max_tokens=48, width=512, layers=6, heads=8, head_dim=64, mlp=2048,
        expert_width=256, expert_mlp=1024, horizon=50, action_dim=32, state_dim=32,
    ),
    "pi05-full": Pi05Config(
        vision=_SIGLIP_SO400M, vocab_size=32000, max_tokens=200, width=2048, layers=18, heads=8, head_dim=256,
        mlp=16384, expert_width=1024, expert_mlp=4096, horizon=50, action_dim=32, state_dim=32,
    ),
    "groot-tiny": GrootConfig(
        vision=_VISION_TINY, vocab_size=256, max_tokens=16, width=128, layers=2, heads=4, kv_heads=2, head_dim=32,
        mlp=384, dit_layers=4, dit_heads=4, dit_head_dim=24, dit_ff=384, output_dim=64, state_hidden=64,
        decoder_hidden=64, horizon=8, action_dim=7, state_dim=8, num_future_tokens=4,
    ),
    "groot-small": GrootConfig(
        vision=_VISION_SMALL, vocab_size=1024, max_tokens=48, width=512, layers=6, heads=8, kv_heads=4, head_dim=64,
        mlp=1536, dit_layers=6, dit_heads=8, dit_head_dim=48, dit_ff=1536, output_dim=256, state_hidden=256,
        decoder_hidden=256, horizon=16, action_dim=32, state_dim=64, num_future_tokens=32,
    ),
    "groot-full": GrootConfig(
        vision=_SIGLIP_SO400M, vocab_size=32000, max_tokens=200, width=2048, layers=12, heads=16, kv_heads=8,
        head_dim=128, mlp=6144, dit_layers=16, dit_heads=32, dit_head_dim=48, dit_ff=6144, output_dim=1024,
        state_hidden=1024, decoder_hidden=1024, horizon=16, action_dim=32, state_dim=64, num_future_tokens=32,
    ),
    "pi05-tabletop": Pi05Config(
        vision=_VISION_TABLETOP, vocab_size=512, max_tokens=10, width=128, layers=3, heads=2, head_dim=64, mlp=256,
        expert_width=96, expert_mlp=192, horizon=8, action_dim=2, state_dim=8, state_token_offset=256,
    ),
    "groot-tabletop": GrootConfig(
        vision=_VISION_TABLETOP, vocab_size=256, max_tokens=10, width=128, layers=2, heads=4, kv_heads=2, head_dim=32,
        mlp=384, dit_layers=4, dit_heads=4, dit_head_dim=24, dit_ff=192, output_dim=64, state_hidden=64,
        decoder_hidden=64, horizon=8, action_dim=2, state_dim=8, num_future_tokens=4,
    ),
}

MODEL_NAMES: tuple[str, ...] = tuple(PRESETS)
BUILD_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

_POLICY_CLASSES = {Pi05Config: Pi05Policy, GrootConfig: GrootPolicy}


def get_config(name: str) -> Pi05Config | GrootConfig:
    """The frozen config of preset `name`; raises ModelNotFoundError listing the valid names."""
    if name not in PRESETS:
        raise ModelNotFoundError(
            f"unknown model {name!r}; valid names are: {', '.join(MODEL_NAMES)}. "
            "Pass one of these, or add a preset to PRESETS in qvla_compiler/models/registry.py."
        )
    return PRESETS[name]


def build_policy(name: str, seed: int = 0, pretrained: bool = True, dtype: torch.dtype = torch.float32) -> FlowPolicy:
    """A randomly initialised policy in eval mode; the same (name, seed, dtype) always gives the same weights.

    `dtype` (fp32 or bf16) is what the weights are created in, so a bf16 build never holds an fp32 copy: half the
    memory, which is what lets the full presets compile on a 24 GiB machine (bf16 is how the real checkpoints ship).

    Presets with a trained checkpoint (`pi05-tabletop`, `groot-tabletop`: qvla_compiler/eval/checkpoints/<name>.safetensors)
    load it, cast to `dtype`, when the file exists and `pretrained` is True (then `seed` does not matter).

    Example::

        policy = build_policy("pi05-tiny", seed=0)
        obs = policy.example_inputs(batch=2)
        actions = policy.sample_actions(**obs, noise=policy.example_noise(batch=2))
    """
    config = get_config(name)
    if dtype not in BUILD_DTYPES.values():
        raise UsageError(f"build_policy: dtype must be torch.float32 or torch.bfloat16 (qvla --dtype fp32 / bf16), "
                         f"got {dtype}")
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        policy = _POLICY_CLASSES[type(config)](config)
    finally:
        torch.set_default_dtype(default)
    if pretrained:
        from qvla_compiler.models.checkpoints import load_checkpoint_if_present

        load_checkpoint_if_present(policy, name)
    return policy
