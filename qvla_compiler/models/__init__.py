"""Reference VLA policies (random weights) with the interface the compiler consumes.

Each policy splits into `embed_prefix(images, tokens, token_mask, state) -> tuple[Tensor, ...]` (once per
observation) and `denoise_step(prefix, x_t, t) -> velocity` (once per Euler step); `euler_sample` drives the loop.
"""

from qvla_compiler.models.groot import GrootConfig, GrootPolicy
from qvla_compiler.models.pi05 import Pi05Config, Pi05Policy
from qvla_compiler.models.registry import MODEL_NAMES, PRESETS, build_policy, get_config
from qvla_compiler.models.sampling import FlowSchedule, euler_sample

__all__ = [
    "MODEL_NAMES",
    "PRESETS",
    "FlowSchedule",
    "GrootConfig",
    "GrootPolicy",
    "Pi05Config",
    "Pi05Policy",
    "build_policy",
    "euler_sample",
    "get_config",
]
