"""Adapter for lerobot 0.6.1's SmolVLA (`SmolVLAPolicy`), and its tiny offline sizes.

SmolVLA's prefix is [image tokens; language tokens; one projected state token] through the first layers of a SmolVLM
text model, prefilled into a transformers DynamicCache. Its expert interleaves self-attention over [prefix; suffix]
with cross-attention layers that re-project the cached VLM K/V. lerobot's `denoise_step` appends the suffix K/V to
the cache and crops it back; here each denoise graph call gets a fresh cache rebuilt from the prefix tuple.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch

from qvla_compiler.integrations._lerobot_base import (
    LerobotAdapter,
    LerobotObservationError,
    _import,
    cache_to_tuple,
    tuple_to_cache,
)

_SMOLVLA = "lerobot.policies.smolvla.modeling_smolvla"
_SMOLVLM = "lerobot.policies.smolvla.smolvlm_with_expert"


class SmolVLAAdapter(LerobotAdapter):
    """lerobot SmolVLAPolicy. Prefix tuple: (prefix_pad_masks [B, T] bool, K_0, V_0, …) of the VLM's kept layers."""

    def __init__(self, policy):
        cfg = policy.config
        if cfg.adapt_to_pi_aloha:
            raise LerobotObservationError(
                "SmolVLA with adapt_to_pi_aloha=True rewrites the state in place and the actions after sampling, "
                "outside the Euler loop a qvla program holds; set config.adapt_to_pi_aloha=False and apply the "
                "Aloha conversion around the quantized program")
        if not cfg.use_cache:
            raise LerobotObservationError("SmolVLA with use_cache=False recomputes the prefix in every denoise step; "
                                          "qvla captures the prefix once: set config.use_cache=True")
        super().__init__(policy)
        self.max_tokens = cfg.tokenizer_max_length
        self.vocab_size = self.model.vlm_with_expert.config.text_config.vocab_size
        m = _import(_SMOLVLA)
        self._make_att_2d_masks = m.make_att_2d_masks

    @property
    def num_steps(self) -> int:
        return self.policy.config.num_steps

    def _preprocess(self, batch):
        return self.policy.prepare_images(batch)  # lerobot's own: resize-with-pad (left/top), [0,1] → [-1,1]

    def _prefix(self, imgs, img_masks, tokens, token_mask, batch):
        """What lerobot's sample_actions does before its Euler loop."""
        m = self.model
        state = self.policy.prepare_state(batch)
        embs, pad_masks, att_masks = m.embed_prefix(imgs, img_masks, tokens, token_mask, state=state)
        att_2d = self._make_att_2d_masks(pad_masks, att_masks)
        position_ids = torch.cumsum(pad_masks, dim=1) - 1
        _, cache = m.vlm_with_expert.forward(attention_mask=att_2d, position_ids=position_ids, past_key_values=None,
                                             inputs_embeds=[embs, None], use_cache=m.config.use_cache)
        return (pad_masks, *cache_to_tuple(cache))

    def _denoise(self, prefix, x_t, t):
        return self.model.denoise_step(prefix_pad_masks=prefix[0], past_key_values=tuple_to_cache(prefix[1:]),
                                       x_t=x_t, timestep=t)

    def _sample(self, imgs, img_masks, tokens, token_mask, batch, noise):
        return self.model.sample_actions(imgs, img_masks, tokens, token_mask, self.policy.prepare_state(batch),
                                         noise=noise)


# --------------------------------------------------------------------------------------------- tiny offline sizes
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=512)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
              image_size=32)
SCALE_FACTOR = 2  # pixel shuffle: 4x4 patches → 4 image tokens per camera
FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN = 510, 511


def _tiny_smolvlm_config():
    from transformers import SmolVLMConfig

    return SmolVLMConfig(text_config=dict(model_type="llama", **TEXT), vision_config=dict(**VISION),
                         scale_factor=SCALE_FACTOR, image_token_id=FAKE_IMAGE_TOKEN - 1, vocab_size=TEXT["vocab_size"])


@contextlib.contextmanager
def tiny_smolvla_sizes() -> Iterator[None]:
    """SmolVLMWithExpertModel always reads its VLM config and processor from the hub (even with
    load_vlm_weights=False) and uses the processor only for two special-token ids: answer both offline."""
    m = _import(_SMOLVLM)
    real = {"AutoConfig": m.AutoConfig, "AutoProcessor": m.AutoProcessor}
    tokenizer = types.SimpleNamespace(fake_image_token_id=FAKE_IMAGE_TOKEN, global_image_token_id=GLOBAL_IMAGE_TOKEN)
    m.AutoConfig = types.SimpleNamespace(from_pretrained=lambda *a, **k: _tiny_smolvlm_config())
    m.AutoProcessor = types.SimpleNamespace(from_pretrained=lambda *a, **k: types.SimpleNamespace(tokenizer=tokenizer))
    try:
        yield
    finally:
        for name, value in real.items():
            setattr(m, name, value)
