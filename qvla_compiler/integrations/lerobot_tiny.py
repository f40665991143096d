"""Tiny random-weight lerobot policies, built offline (no hub access), for tests and benchmarks.

    from qvla_compiler.integrations.lerobot_tiny import build_tiny
    policy = build_tiny("pi05")          # a real lerobot PI05Policy, ~1M parameters, random weights

lerobot sizes pi0/pi0.5 by name (`get_gemma_config("gemma_2b")`, SigLIP so400m defaults) and SmolVLA by a hub model
id; `tiny_sizes(kind)` swaps in small sizes while lerobot's own constructors run (also while `from_pretrained` reads a
folder that `save_pretrained` wrote from a tiny policy). The structure is lerobot's, only the widths shrink: pi0/pi0.5
keep 8 query heads and 1 KV head of the same head_dim in the VLM and the expert, as their shared attention needs.
"""
from __future__ import annotations

import contextlib
import io
from typing import Iterator

import torch
from torch import nn

from qvla_compiler.errors import QvlaError
from qvla_compiler.integrations._lerobot_base import _import

KINDS = ("pi05", "pi0", "smolvla")
VOCAB = 512
IMAGE = 32
CAMERAS = ("observation.images.base_0_rgb", "observation.images.left_wrist_0_rgb")
# GemmaConfig fields per lerobot variant name: the VLM ("gemma_2b") and the action expert ("gemma_300m")
GEMMA = {"gemma_2b": dict(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=16),
         "gemma_300m": dict(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=16)}
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)


class UnknownTinyPolicyError(QvlaError, KeyError):
    """build_tiny / tiny_sizes got a kind that has no tiny configuration."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _check(kind: str) -> None:
    if kind not in KINDS:
        raise UnknownTinyPolicyError(f"no tiny lerobot policy {kind!r}; choose one of {list(KINDS)}")


def _shrink_vision(vision_config, width: int) -> None:
    for key, value in VISION.items():
        setattr(vision_config, key, value)
    vision_config.projection_dim = width  # the projector must land on the language model's width


@contextlib.contextmanager
def _pi_sizes(module_name: str) -> Iterator[None]:
    m = _import(module_name)
    real = {n: getattr(m, n) for n in ("get_gemma_config", "PaliGemmaForConditionalGenerationWithPiGemma",
                                       "PiGemmaForCausalLM")}

    def get_gemma_config(variant: str):
        return m.GemmaConfig(**GEMMA[variant])

    def vlm(config):
        _shrink_vision(config.vision_config, GEMMA["gemma_2b"]["width"])
        config.text_config.vocab_size = VOCAB
        if hasattr(config, "_vocab_size"):
            config._vocab_size = VOCAB
        return real["PaliGemmaForConditionalGenerationWithPiGemma"](config=config)

    def expert(config):
        config.vocab_size = VOCAB  # its lm_head is unused; keep it small
        return real["PiGemmaForCausalLM"](config=config)

    patched = {"get_gemma_config": get_gemma_config, "PaliGemmaForConditionalGenerationWithPiGemma": vlm,
               "PiGemmaForCausalLM": expert}
    for name, fn in patched.items():
        setattr(m, name, fn)
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(m, name, fn)


@contextlib.contextmanager
def tiny_sizes(kind: str) -> Iterator[None]:
    """While active, lerobot builds `kind` policies at the tiny sizes of this module (not thread-safe)."""
    _check(kind)
    if kind == "pi05":
        with _pi_sizes("lerobot.policies.pi05.modeling_pi05"):
            yield
    elif kind == "pi0":
        with _pi_sizes("lerobot.policies.pi0.modeling_pi0"):
            yield
    else:
        from qvla_compiler.integrations._lerobot_smolvla import tiny_smolvla_sizes

        with tiny_smolvla_sizes():
            yield


def tiny_config(kind: str, **overrides):
    """lerobot config object for a tiny `kind` policy: two 32-px cameras, 6-D state and action (padded to 8),
    12 language tokens, a chunk of 8 actions; lerobot's default number of Euler steps."""
    _check(kind)
    types = _import("lerobot.configs.types")
    feat = types.PolicyFeature
    inputs = {cam: feat(type=types.FeatureType.VISUAL, shape=(3, IMAGE, IMAGE)) for cam in CAMERAS}
    inputs["observation.state"] = feat(type=types.FeatureType.STATE, shape=(6,))
    outputs = {"action": feat(type=types.FeatureType.ACTION, shape=(6,))}
    common = dict(device="cpu", input_features=inputs, output_features=outputs, chunk_size=8, n_action_steps=8,
                  max_state_dim=8, max_action_dim=8, tokenizer_max_length=12)
    if kind == "pi05":
        cfg = _import("lerobot.policies.pi05.configuration_pi05").PI05Config
        common.update(image_resolution=(IMAGE, IMAGE))
    elif kind == "pi0":
        cfg = _import("lerobot.policies.pi0.configuration_pi0").PI0Config
        common.update(image_resolution=(IMAGE, IMAGE))
    else:
        cfg = _import("lerobot.policies.smolvla.configuration_smolvla").SmolVLAConfig
        common.update(resize_imgs_with_padding=(IMAGE, IMAGE), load_vlm_weights=False,
                      vlm_model_name="tiny-smolvlm-offline", num_vlm_layers=2, num_expert_layers=2)
    common.update(overrides)
    return cfg(**common)


def randomize(model: nn.Module, seed: int = 0) -> None:
    """Random weights that carry signal through a tiny network: linears N(0, 1/fan_in), biases N(0, 0.02²),
    embeddings N(0, 1); norms keep their init. pi0.5's adaRMS `dense` linears (scale, shift, gate) get 5x smaller
    weights and a gate bias near 1, so the expert's residual branches count (lerobot zero-inits them: gate = bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear):
                adaptive = name.endswith("dense")
                std = mod.in_features ** -0.5 * (0.2 if adaptive else 1.0)
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * std)
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=gen) * 0.02)
                    if adaptive:
                        mod.bias[2 * mod.out_features // 3:] += 1.0
            elif isinstance(mod, nn.Embedding):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen))
            elif isinstance(mod, nn.Conv2d):
                fan_in = mod.in_channels * mod.kernel_size[0] * mod.kernel_size[1]
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=gen) * fan_in ** -0.5)


def build_tiny(kind: str, seed: int = 0, **config_overrides):
    """A real lerobot policy object (PI05Policy / PI0Policy / SmolVLAPolicy) at tiny sizes, random weights, eval."""
    cfg = tiny_config(kind, **config_overrides)
    cls_name = {"pi05": "PI05Policy", "pi0": "PI0Policy", "smolvla": "SmolVLAPolicy"}[kind]
    module = {"pi05": "lerobot.policies.pi05.modeling_pi05", "pi0": "lerobot.policies.pi0.modeling_pi0",
              "smolvla": "lerobot.policies.smolvla.modeling_smolvla"}[kind]
    cls = getattr(_import(module), cls_name)
    torch.manual_seed(seed)
    with tiny_sizes(kind), contextlib.redirect_stdout(io.StringIO()):  # lerobot prints its layer trimming
        policy = cls(cfg)
    randomize(policy.model, seed)
    return policy.eval()
