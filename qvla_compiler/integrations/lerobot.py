"""lerobot policies as qvla policies: `wrap(policy)` → an nn.Module implementing qvla_compiler.protocol.VLAPolicy.

    from qvla_compiler.integrations.lerobot import wrap
    qpolicy = wrap(lerobot_policy)                     # PI05Policy, PI0Policy or SmolVLAPolicy (lerobot 0.6.1)
    qp = qvla_compiler.quantize(qpolicy, qpolicy.example_inputs(), qpolicy.calibration_batches(8),
                                recipe=qpolicy.recipe("w8a8"))       # preset + the policy's role overrides
    actions = qp.module()(**qpolicy.from_lerobot_batch(batch), noise=noise)   # == lerobot's sample_actions

What the wrapper maps (lerobot → qvla):
- observation: lerobot's batch dict (one `observation.images.<cam>` tensor [B, 3, H, W] in [0, 1] per camera,
  `observation.language.tokens` / `.attention_mask`, `observation.state`) ↔ qvla's (images [B, n_cams, 3, H, W],
  tokens [B, L] int64, token_mask [B, L] bool, state [B, state_dim]); `to_lerobot_batch` / `from_lerobot_batch`.
  Cameras are stacked in `config.image_features` order (lerobot's `empty_camera_*` placeholders excluded: lerobot
  fills those itself). Tokens are what lerobot's processor produces (for pi0.5 they already carry the discretised
  state, so pi0.5's `state` input is unused, as in lerobot).
- embed_prefix: lerobot's own image preprocessing (resize-with-pad, [0,1]→[-1,1]), `embed_prefix` and VLM prefill
  with `use_cache=True`; returns the cache as a flat tuple (prefix pad mask, [state,] K_0, V_0, K_1, V_1, …).
- denoise_step: rebuilds a transformers DynamicCache from that tuple and calls lerobot's own `denoise_step`.
- schedule: lerobot's Euler loop (`common/flow_matching.py:euler_integrate`): t = 1 + k·dt for k < steps, dt = −1/steps,
  x ← x + dt·v, the time tensor float32 — the very same floats, so layout `none` is bit-identical to lerobot.
- sample_actions: lerobot's own `model.sample_actions` after the same preprocessing; actions are [B, chunk_size,
  max_action_dim] (lerobot's `predict_action_chunk` then keeps the first `action_dim` columns: `to_lerobot_actions`).

lerobot is imported lazily (importing this module needs only torch); every policy class import goes through
`_import`, which installs a torchvision shim when torchvision's CUDA-linked extension cannot load on a CPU-only torch.

The adapters' shared base (LerobotAdapter, the error classes, `_import`, the cache helpers) lives in `_lerobot_base`
and is re-exported here; the adapter modules import it from there, never from this module (no import cycle).
"""
from __future__ import annotations

import importlib
import os

from torch import nn

from qvla_compiler.integrations._lerobot_base import (  # noqa: F401 — re-exported: the public names live here too
    INSTALL_COMMAND,
    INSTALL_HINT,
    LANG_MASK,
    LANG_TOKENS,
    OBS_KEYS,
    STATE,
    LerobotAdapter,
    LerobotNotInstalledError,
    LerobotObservationError,
    UnsupportedLerobotPolicyError,
    _import,
    _torchvision_shim,
    cache_to_tuple,
    tuple_to_cache,
)

# lerobot policy class name → (module to import, adapter class in qvla_compiler.integrations)
POLICIES = {
    "PI05Policy": ("lerobot.policies.pi05.modeling_pi05", "_lerobot_pi", "Pi05Adapter"),
    "PI0Policy": ("lerobot.policies.pi0.modeling_pi0", "_lerobot_pi", "Pi0Adapter"),
    "SmolVLAPolicy": ("lerobot.policies.smolvla.modeling_smolvla", "_lerobot_smolvla", "SmolVLAAdapter"),
}


# ------------------------------------------------------------------------------------------------------ wrapping
def wrap(policy: nn.Module) -> "LerobotAdapter":
    """The lerobot `policy` (PI05Policy, PI0Policy, SmolVLAPolicy) as a qvla policy module sharing its weights.

    Example::

        qpolicy = wrap(PI05Policy.from_pretrained("my/pi05_checkpoint"))
        qp = qvla_compiler.quantize(qpolicy, qpolicy.example_inputs(), calib, recipe=qpolicy.recipe("w8a8"))
        obs = qpolicy.from_lerobot_batch(preprocessed_batch)
        actions = qpolicy.to_lerobot_actions(qp.module()(*obs.values(), noise))
    """
    if isinstance(policy, LerobotAdapter):
        return policy
    name = type(policy).__name__
    if name == "GrootPolicy":  # lerobot 0.4.4, installed on its own (see lerobot_groot)
        from qvla_compiler.integrations.lerobot_groot import GrootAdapter

        return GrootAdapter(policy)
    if name not in POLICIES:
        raise UnsupportedLerobotPolicyError(
            f"wrap() got a {type(policy).__module__}.{name}; it wraps lerobot's {', '.join(POLICIES)} "
            "(lerobot 0.6.1) and GrootPolicy (lerobot 0.4.4) policy objects, not their inner .model). fix: pass the policy object, e.g. "
            "PI05Policy.from_pretrained(dir), or quantize another module with qvla_compiler.quantize(module, args, "
            "calib) as a plain module")
    module, adapter_module, adapter = POLICIES[name]
    if not isinstance(policy, getattr(_import(module), name)):
        raise UnsupportedLerobotPolicyError(f"wrap() got a {type(policy).__module__}.{name}, which is not lerobot's "
                                            f"{module}.{name}; pass a lerobot 0.6.1 policy object")
    cls = getattr(importlib.import_module(f"qvla_compiler.integrations.{adapter_module}"), adapter)
    return cls(policy)


def load_pretrained(path: str | os.PathLike) -> "LerobotAdapter":
    """Read a lerobot policy folder (config.json + model.safetensors, as `save_pretrained` writes it) offline and wrap
    it. The policy type comes from config.json's "type" (pi05, pi0, smolvla)."""
    import json

    config_file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config_file):
        raise LerobotObservationError(f"{path} is not a lerobot policy folder (no config.json); write one with "
                                      "policy.save_pretrained(dir) or download a checkpoint first")
    with open(config_file, encoding="utf-8") as f:
        kind = json.load(f).get("type")
    by_type = {"pi05": "PI05Policy", "pi0": "PI0Policy", "smolvla": "SmolVLAPolicy"}
    if kind not in by_type:
        raise UnsupportedLerobotPolicyError(f"{config_file} has type {kind!r}; supported: {sorted(by_type)}")
    name = by_type[kind]
    cls = getattr(_import(POLICIES[name][0]), name)
    policy = cls.from_pretrained(os.fspath(path), local_files_only=True)
    return wrap(policy.eval())
