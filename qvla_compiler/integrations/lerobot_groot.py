"""GR00T N1.5 from lerobot 0.4.4 (`GrootPolicy`) as a qvla policy, and a tiny offline build of it.

lerobot 0.4.4 is the same package as the 0.6.1 that serves pi0 / pi0.5 / SmolVLA, at another version, so it lives in
its own folder (`TARGET=<dir> bash scripts/install_lerobot_groot.sh`, then `PYTHONPATH=<dir>`).

Mapping (qvla ↔ GR00T's batch after its processor):
- images [B, n_cams, 3, H, W] in [0, 1] ↔ `eagle_pixel_values` [B·n_cams, 3, H, W] in [-1, 1] (Eagle's mean/std 0.5);
  tokens / token_mask ↔ `eagle_input_ids` / `eagle_attention_mask` = [image tokens of every camera; text tokens];
  state [B, max_state_dim] ↔ `state` (padded, normalized); the embodiment id comes from `config.embodiment_tag`.
- embed_prefix: Eagle backbone (SigLIP + truncated Qwen3), then the action head's `process_backbone_output` (vlln +
  VL self-attention) and state encoder → (backbone features, state features).
- denoise_step: the body of GR00T's `FlowmatchingActionHead.get_action` loop (action encoder, position embedding,
  future tokens, DiT, action decoder) on lerobot's modules; GR00T has no separate step method to call.
- schedule: GR00T's loop: t_k = int(k/N · buckets)/buckets for k < N, dt = 1/N, x ← x + dt·v (noise at t = 0);
  the step turns t back into the integer bucket GR00T feeds its timestep encoder.
- sample_actions: GR00T's own `get_action`, with `torch.randn` answering the given noise (it draws its own).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Iterator

import torch
from torch import Tensor, nn

from qvla_compiler.integrations._lerobot_base import (
    LerobotAdapter,
    LerobotNotInstalledError,
    LerobotObservationError,
    _import,
)
from qvla_compiler.models.sampling import FlowSchedule

INSTALL_GROOT = "TARGET=<dir> bash scripts/install_lerobot_groot.sh, then run with PYTHONPATH=<dir>"
_MODELING = "lerobot.policies.groot.modeling_groot"


def import_groot():
    """lerobot 0.4.4's GrootPolicy class, or LerobotNotInstalledError saying how to install it."""
    try:
        return _import(_MODELING).GrootPolicy
    except LerobotNotInstalledError as exc:
        raise LerobotNotInstalledError(f"GR00T N1.5 needs lerobot 0.4.4 in its own folder: {INSTALL_GROOT} "
                                       f"({exc})") from exc


def _embodiment_id(tag: str) -> int:
    proc = _import("lerobot.policies.groot.processor_groot")
    for cls in vars(proc).values():
        if dataclasses.is_dataclass(cls):
            for f in dataclasses.fields(cls):
                if f.name == "embodiment_mapping" and f.default_factory is not dataclasses.MISSING:
                    return f.default_factory().get(tag, 0)
    return 0


class GrootAdapter(LerobotAdapter):
    """lerobot GrootPolicy. Prefix tuple: (VL features [B, T, D] after vlln + VL self-attention, state features)."""

    def __init__(self, policy):
        super().__init__(policy)
        head, eagle = self.model.action_head, self.model.backbone.eagle_model
        self.horizon, self.noise_dim = head.action_horizon, head.action_dim
        self.state_dim = policy.config.max_state_dim
        self.max_tokens = policy.config.tokenizer_max_length if hasattr(policy.config, "tokenizer_max_length") else 12
        self.vocab_size = eagle.language_model.config.vocab_size
        self.image_token = eagle.image_token_index
        self.image_tokens = eagle.num_image_token  # per camera
        self.buckets = head.num_timestep_buckets
        self.embodiment = _embodiment_id(policy.config.embodiment_tag)
        # QuantVLA keeps GR00T's VL self-attention blocks float (its layout: LLM + DiT MLPs, 116 linears at full
        # size); they run once per chunk on the observation, so they land in the prefix graph: say they are head.
        self.region_overrides = (("model.action_head.vl_self_attention", "action_head"),)
        self.skip = ("model.action_head.vl_self_attention",)
        n = self.num_steps
        self.schedule = FlowSchedule(timesteps=tuple(int(k / float(n) * self.buckets) / self.buckets
                                                     for k in range(n)), dt=1.0 / n)

    @staticmethod
    def _core(policy):
        return policy._groot_model  # GR00TN15: Eagle backbone + flow-matching action head

    @property
    def num_steps(self) -> int:
        return self.policy._groot_model.action_head.num_inference_timesteps

    # ---- observation mapping
    def to_lerobot_batch(self, images, tokens, token_mask, state):
        if images.dim() != 5 or images.shape[1] != len(self.cameras):
            raise LerobotObservationError(f"images must be [B, {len(self.cameras)}, 3, H, W], got {list(images.shape)}")
        b, n = images.shape[:2]
        img_ids = tokens.new_full((b, n * self.image_tokens), self.image_token)
        return {"eagle_input_ids": torch.cat([img_ids, tokens], dim=1),
                "eagle_attention_mask": torch.cat([torch.ones_like(img_ids), token_mask.long()], dim=1),
                "eagle_pixel_values": images.flatten(0, 1) * 2.0 - 1.0,
                "eagle_image_sizes": torch.tensor(list(images.shape[-2:])).expand(b * n, 2),  # GR00T drops it
                "state": state[:, None, :], "state_mask": torch.ones_like(state[:, None, :], dtype=torch.bool),
                "embodiment_id": torch.full((b,), self.embodiment, dtype=torch.long, device=state.device)}

    def from_lerobot_batch(self, batch):
        ids, pix = batch["eagle_input_ids"], batch["eagle_pixel_values"]
        n_img = len(self.cameras) * self.image_tokens
        if not bool((ids[:, :n_img] == self.image_token).all()):
            raise LerobotObservationError("from_lerobot_batch expects the image tokens of every camera first in "
                                          "eagle_input_ids, then the text; build batches with to_lerobot_batch")
        b = ids.shape[0]
        return {"images": ((pix + 1.0) / 2.0).view(b, len(self.cameras), *pix.shape[1:]), "tokens": ids[:, n_img:],
                "token_mask": batch["eagle_attention_mask"][:, n_img:].bool(), "state": batch["state"][:, -1]}

    def _lists(self, images, tokens, token_mask, state):
        return (self.to_lerobot_batch(images, tokens, token_mask, state),)

    # ---- protocol
    def _autocast(self):
        """GR00T runs get_action under bf16 autocast when config.use_bf16 (its default): so do the captured steps
        (export keeps the block; inline_subgraphs makes its casts explicit)."""
        device = next(self.model.parameters()).device
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=self.policy.config.use_bf16)

    def _prefix(self, batch):
        with self._autocast():
            return self._prefix_body(batch)

    def _prefix_body(self, batch):
        g = self.model
        backbone_in, action_in = g.prepare_input(batch)
        out = g.action_head.process_backbone_output(g.backbone(backbone_in))
        state_features = g.action_head.state_encoder(action_in.state, action_in.embodiment_id)
        return out.backbone_features, state_features, action_in.embodiment_id

    def _denoise(self, prefix, x_t, t):
        with self._autocast():
            return self._denoise_body(prefix, x_t, t)

    def _denoise_body(self, prefix, x_t, t):
        vl_embs, state_features, embodiment_id = prefix
        head = self.model.action_head
        timesteps = torch.round(t * self.buckets).long()  # GR00T's integer bucket, exactly
        action_features = head.action_encoder(x_t, timesteps, embodiment_id)
        if head.config.add_pos_embed:
            pos_ids = torch.arange(action_features.shape[1], dtype=torch.long, device=x_t.device)
            action_features = action_features + head.position_embedding(pos_ids).unsqueeze(0)
        future = head.future_tokens.weight.unsqueeze(0).expand(vl_embs.shape[0], -1, -1)
        sa_embs = torch.cat((state_features, future, action_features), dim=1)
        out = head.model(hidden_states=sa_embs, encoder_hidden_states=vl_embs, timestep=timesteps)
        return head.action_decoder(out, embodiment_id)[:, -head.action_horizon:]

    def _sample(self, batch, noise):
        with _randn_returns(noise), contextlib.redirect_stdout(io.StringIO()), self._autocast():
            return self.model.get_action(batch)["action_pred"]


@contextlib.contextmanager
def _randn_returns(noise: Tensor) -> Iterator[None]:
    """GR00T's get_action draws its initial noise with torch.randn; answer that one call with `noise`."""
    real = torch.randn

    def randn(*args, **kwargs):
        size = kwargs.get("size", args[0] if len(args) == 1 else args)
        if tuple(size) == tuple(noise.shape):
            return noise.to(dtype=kwargs.get("dtype") or noise.dtype).clone()
        return real(*args, **kwargs)

    torch.randn = randn
    try:
        yield
    finally:
        torch.randn = real


# --------------------------------------------------------------------------------------------- tiny offline build
CAMERAS = ("observation.images.ego_view", "observation.images.wrist")
EAGLE_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, patch_size=8, image_size=32, vision_use_head=False)
EAGLE_TEXT = dict(architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
IMAGE_TOKEN = 511


def _tiny_groot_config(horizon: int, action_dim: int, state_dim: int) -> dict:
    dit = dict(attention_head_dim=16, cross_attention_dim=EAGLE_TEXT["hidden_size"], dropout=0.2, final_dropout=True,
               interleave_self_attention=True, norm_type="ada_norm", num_attention_heads=2, num_layers=2,
               output_dim=32, positional_embeddings=None)
    head = dict(action_dim=action_dim, action_horizon=horizon, add_pos_embed=True,
                backbone_embedding_dim=EAGLE_TEXT["hidden_size"], diffusion_model_cfg=dit, hidden_size=32,
                input_embedding_dim=32, max_action_dim=action_dim, max_state_dim=state_dim, model_dtype="float32",
                noise_beta_alpha=1.5, noise_beta_beta=1.0, noise_s=0.999, num_inference_timesteps=4,
                num_target_vision_tokens=4, num_timestep_buckets=1000, tune_diffusion_model=True,
                tune_projector=True, use_vlln=True, max_num_embodiments=32,
                vl_self_attention_cfg=dict(attention_head_dim=16, dropout=0.2, final_dropout=True,
                                           num_attention_heads=4, num_layers=1, positional_embeddings=None))
    backbone = dict(tune_llm=False, tune_visual=False, select_layer=2, reproject_vision=False,
                    use_flash_attention=False, load_bf16=False, project_to_dim=None)
    return dict(backbone_cfg=backbone, action_head_cfg=head, action_horizon=horizon, action_dim=action_dim,
                compute_dtype="float32")


@contextlib.contextmanager
def tiny_groot_sizes(horizon: int = 4, action_dim: int = 8, state_dim: int = 8) -> Iterator[None]:
    """While active, GrootPolicy builds a tiny random GR00T N1.5 instead of downloading nvidia/GR00T-N1.5-3B and
    the Eagle processor; the Eagle vision tower uses SDPA instead of the forced flash_attention_2."""
    n1 = _import("lerobot.policies.groot.groot_n1")
    modeling = _import(_MODELING)
    ecfg = _import("lerobot.policies.groot.eagle2_hg_model.configuration_eagle2_5_vl")
    emod = _import("lerobot.policies.groot.eagle2_hg_model.modeling_eagle2_5_vl")
    from transformers import SiglipVisionModel

    def eagle_config(*args, **kwargs):
        cfg = ecfg.Eagle25VLConfig(vision_config=dict(EAGLE_VISION), text_config=dict(EAGLE_TEXT), select_layer=-1,
                                   use_pixel_shuffle=False, mlp_connector_layers=1, image_token_index=IMAGE_TOKEN,
                                   _attn_implementation="sdpa")
        cfg.text_config._attn_implementation = "sdpa"
        return cfg

    def eagle_model(cfg, **kwargs):
        cfg.vision_config._attn_implementation = "sdpa"
        return emod.Eagle25VLForConditionalGeneration(cfg, vision_model=SiglipVisionModel(cfg.vision_config))

    class TinyGR00T:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return n1.GR00TN15(n1.GR00TN15Config(**_tiny_groot_config(horizon, action_dim, state_dim)),
                               local_model_path="")

    real = {(n1, "ensure_eagle_cache_ready"): n1.ensure_eagle_cache_ready, (n1, "AutoConfig"): n1.AutoConfig,
            (n1, "AutoModel"): n1.AutoModel, (modeling, "GR00TN15"): modeling.GR00TN15}
    n1.ensure_eagle_cache_ready = lambda *a, **k: None
    n1.AutoConfig = type("TinyEagleConfig", (), {"from_pretrained": staticmethod(eagle_config)})
    n1.AutoModel = type("TinyEagleModel", (), {"from_config": staticmethod(eagle_model)})
    modeling.GR00TN15 = TinyGR00T
    try:
        yield
    finally:
        for (module, name), value in real.items():
            setattr(module, name, value)


def build_tiny_groot(seed: int = 0, use_bf16: bool = False):
    """A real lerobot 0.4.4 GrootPolicy at tiny sizes, random weights, float32, eval (`use_bf16`: GR00T's default,
    bf16 inputs and bf16 autocast at inference)."""
    from qvla_compiler.integrations.lerobot_tiny import randomize

    GrootPolicy = import_groot()
    types = _import("lerobot.configs.types")
    cfg_cls = _import("lerobot.policies.groot.configuration_groot").GrootConfig
    feat = types.PolicyFeature
    inputs = {cam: feat(type=types.FeatureType.VISUAL, shape=(3, 32, 32)) for cam in CAMERAS}
    inputs["observation.state"] = feat(type=types.FeatureType.STATE, shape=(6,))
    cfg = cfg_cls(device="cpu", input_features=inputs,
                  output_features={"action": feat(type=types.FeatureType.ACTION, shape=(6,))},
                  chunk_size=4, n_action_steps=4, max_state_dim=8, max_action_dim=8, use_bf16=use_bf16)
    torch.manual_seed(seed)
    with tiny_groot_sizes(), contextlib.redirect_stdout(io.StringIO()):
        policy = GrootPolicy(cfg)
    randomize(policy._groot_model, seed)
    return policy.eval()
