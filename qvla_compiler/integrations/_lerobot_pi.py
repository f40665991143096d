"""Adapters for lerobot 0.6.1's pi0.5 (`PI05Policy`) and pi0 (`PI0Policy`).

Both are PaliGemma (SigLIP + Gemma) prefixes whose prefill leaves a transformers DynamicCache, and a Gemma action
expert whose `denoise_step` attends to that cache. The prefix graph returns the cache as flat tensors; the denoise
graph rebuilds a DynamicCache from them and calls lerobot's own `denoise_step` (which clones it, as in lerobot).
pi0 additionally feeds the (padded) state to every denoise step, so it travels in the prefix tuple.
"""
from __future__ import annotations

import torch
from torch import Tensor

from qvla_compiler.integrations._lerobot_base import LerobotAdapter, _import, cache_to_tuple, tuple_to_cache

_PI05 = "lerobot.policies.pi05.modeling_pi05"
_PI0 = "lerobot.policies.pi0.modeling_pi0"


class _PaliGemmaAdapter(LerobotAdapter):
    _module: str

    def __init__(self, policy):
        super().__init__(policy)
        cfg = policy.config
        self.max_tokens = cfg.tokenizer_max_length
        self.vocab_size = self.model.paligemma_with_expert.paligemma.config.text_config.vocab_size
        m = _import(self._module)
        self._fn = {name: getattr(m, name) for name in ("make_att_2d_masks", "prepare_attention_masks_4d")}

    @property
    def num_steps(self) -> int:  # read by LerobotAdapter.__init__ before num_steps_ exists
        return self.policy.config.num_inference_steps

    def _preprocess(self, batch):
        return self.policy._preprocess_images(batch)  # lerobot's own: resize-with-pad, [0,1] → [-1,1]

    def _prefill(self, imgs, img_masks, tokens, token_mask) -> tuple[Tensor, tuple[Tensor, ...]]:
        """What lerobot's sample_actions does before its Euler loop: embed, 2-D masks, VLM prefill with a cache."""
        m = self.model
        embs, pad_masks, att_masks = m.embed_prefix(imgs, img_masks, tokens, token_mask)
        att_2d = self._fn["make_att_2d_masks"](pad_masks, att_masks)
        position_ids = torch.cumsum(pad_masks, dim=1) - 1
        mask_4d = self._fn["prepare_attention_masks_4d"](att_2d)
        m.paligemma_with_expert.paligemma.model.language_model.config._attn_implementation = "eager"
        _, cache = m.paligemma_with_expert.forward(attention_mask=mask_4d, position_ids=position_ids,
                                                   past_key_values=None, inputs_embeds=[embs, None], use_cache=True)
        return pad_masks, cache_to_tuple(cache)


class Pi05Adapter(_PaliGemmaAdapter):
    """lerobot PI05Policy. Prefix tuple: (prefix_pad_masks [B, T] bool, K_0, V_0, …, K_{L-1}, V_{L-1}), each K/V
    [B, kv_heads, T, head_dim] post-RoPE. The `state` input is unused: pi0.5 reads the state from its tokens."""

    _module = _PI05

    def _prefix(self, imgs, img_masks, tokens, token_mask, batch):
        pad_masks, kv = self._prefill(imgs, img_masks, tokens, token_mask)
        return (pad_masks, *kv)

    def _denoise(self, prefix, x_t, t):
        return self.model.denoise_step(prefix_pad_masks=prefix[0], past_key_values=tuple_to_cache(prefix[1:]),
                                       x_t=x_t, timestep=t)

    def _sample(self, imgs, img_masks, tokens, token_mask, batch, noise):
        return self.model.sample_actions(imgs, img_masks, tokens, token_mask, noise=noise)


class Pi0Adapter(_PaliGemmaAdapter):
    """lerobot PI0Policy. Prefix tuple: (prefix_pad_masks, state padded to max_state_dim, K_0, V_0, …)."""

    _module = _PI0

    def _prefix(self, imgs, img_masks, tokens, token_mask, batch):
        pad_masks, kv = self._prefill(imgs, img_masks, tokens, token_mask)
        return (pad_masks, self.policy.prepare_state(batch), *kv)

    def _denoise(self, prefix, x_t, t):
        return self.model.denoise_step(state=prefix[1], prefix_pad_masks=prefix[0],
                                       past_key_values=tuple_to_cache(prefix[2:]), x_t=x_t, timestep=t)

    def _sample(self, imgs, img_masks, tokens, token_mask, batch, noise):
        return self.model.sample_actions(imgs, img_masks, tokens, token_mask, self.policy.prepare_state(batch),
                                         noise=noise)
